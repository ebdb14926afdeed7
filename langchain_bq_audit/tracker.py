"""Runs started but not ended, for one destination table, shared by all its handlers.

Sharing is what makes a run seen by two handlers of the same table (say a global one and
an explicit one) give one row: the first handler to see a run's start owns it, the others
leave it alone. Plain dict operations only, atomic under the GIL: no lock on the hot path.
"""

from __future__ import annotations

from uuid import UUID

from .records import RunRecord


class RunTracker:
    """Pending runs keyed by run id, bounded, with a sweep for runs that never end."""

    __slots__ = ("abandoned", "max_pending", "runs", "ttl_s")

    def __init__(self, max_pending: int, ttl_s: float) -> None:
        self.runs: dict[UUID, RunRecord] = {}
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self.abandoned = 0

    def sweep(self, now: float) -> list[RunRecord]:
        """Runs started more than `ttl_s` ago and never ended, marked `abandoned`.

        Called by the writer thread. A run's end that arrives later counts as unmatched.
        """
        cutoff = now - self.ttl_s
        out = []
        for run_id, rec in self.runs.copy().items():  # dict.copy is atomic under the GIL
            if rec.start_time < cutoff and self.runs.pop(run_id, None) is rec:
                rec.status = "abandoned"
                rec.end_time = now
                out.append(rec)
        self.abandoned += len(out)  # only the writer thread writes this counter
        return out

    def forget(self) -> None:
        """In a forked child: runs in flight at the fork are the parent's to end."""
        self.runs.clear()
