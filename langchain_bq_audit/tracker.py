"""Runs started but not ended, for one destination table, shared by all its handlers.

Sharing is what makes a run seen by two handlers of the same table (say a global one and
an explicit one) give one row: the first handler to see a run's start owns it, the others
leave it alone. Plain dict operations only, atomic under the GIL: no lock on the hot path.
"""

from __future__ import annotations

import threading
from uuid import UUID

from .records import RunRecord

#: A pending run's key: its run id, or (run id, n) for a run started while another run with
#: the same id was pending (see `RunTracker.add_repeat`).
RunKey = UUID | tuple[UUID, int]


class RunNotEnded(Exception):
    """Why a run's row was written without its end: the `error_message` of that row."""


class RunTracker:
    """Pending runs keyed by run id, bounded, with a sweep for runs that never end."""

    __slots__ = ("_lock", "abandoned", "max_pending", "repeats", "run_id_collisions", "runs",
                 "ttl_s")  # fmt: skip

    def __init__(self, max_pending: int, ttl_s: float) -> None:
        self.runs: dict[RunKey, RunRecord] = {}
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self.abandoned = 0
        # Run ids that more than one pending run has, with the extra runs' keys. Rare (a
        # caller reusing `config={"run_id": ...}`), so it has a lock of its own.
        self.repeats: dict[UUID, list[tuple[UUID, int]]] = {}
        self.run_id_collisions = 0
        self._lock = threading.Lock()

    def add_repeat(self, rec: RunRecord) -> None:
        """Track `rec`, whose run id another pending run has, as a run of its own."""
        with self._lock:
            self.run_id_collisions += 1
            key = (rec.run_id, self.run_id_collisions)
            self.repeats.setdefault(rec.run_id, []).append(key)
            self.runs[key] = rec

    def key_to_end(self, run_id: UUID, thread: int) -> RunKey:
        """The key of the pending run an end for `run_id` closes, when several runs have that
        id: the oldest started in the calling thread, else the oldest."""
        with self._lock:
            keys = self.repeats.get(run_id)
            if not keys:
                return run_id
            live = [k for k in keys if k in self.runs]
            candidates: list[RunKey] = [run_id] if run_id in self.runs else []
            candidates += live
            if not candidates:
                return run_id
            key = next((k for k in candidates if self.runs[k].thread == thread), candidates[0])
            if key != run_id:
                live.remove(key)  # type: ignore[arg-type]
            if live:
                self.repeats[run_id] = live
            else:
                del self.repeats[run_id]
            return key

    def sweep(self, now: float) -> list[RunRecord]:
        """Runs started more than `ttl_s` ago and never ended, marked `abandoned`.

        Called by the writer thread. A run's end that arrives later counts as unmatched.
        """
        cutoff = now - self.ttl_s
        out = []
        for key, rec in self.runs.copy().items():  # dict.copy is atomic under the GIL
            if rec.start_time < cutoff and self.runs.pop(key, None) is rec:
                rec.status = "abandoned"
                rec.end_time = now
                out.append(rec)
        self.abandoned += len(out)  # only the writer thread writes this counter
        return out

    def end_descendants(self, rec: RunRecord, now: float) -> list[RunRecord]:
        """Pending runs under `rec`, which just ended in an error or a cancellation, marked
        `cancelled`: LangChain sends no end for a model call cut off by `asyncio.wait_for`,
        so without this its row would wait `ttl_s`. A scan of the pending runs of one
        trace, on error ends only. An end that still comes later counts as unmatched."""
        trace = rec.trace_id
        mine = [(k, r) for k, r in self.runs.copy().items() if r.trace_id == trace and r is not rec]
        ended = {rec.run_id}
        out: list[RunRecord] = []
        grew = True
        while grew:  # a grandchild's parent may come later in the list than the grandchild
            grew = False
            for key, child in mine:  # keyed as pending: run ids may repeat (add_repeat)
                if child.parent_run_id in ended and child.run_id not in ended:
                    ended.add(child.run_id)
                    grew = True
                    if self.runs.pop(key, None) is child:
                        child.status = "cancelled"
                        why = type(rec.error).__name__
                        child.error = RunNotEnded(f"no end: run {rec.run_id} above it ended "
                                                  f"first ({why})")  # fmt: skip
                        child.end_time = now
                        out.append(child)
        return out

    def abandon_all(self, now: float) -> list[RunRecord]:
        """Every pending run, marked `abandoned` (the writer is closing: exit, SIGTERM)."""
        out = []
        for run_id, rec in self.runs.copy().items():
            if self.runs.pop(run_id, None) is rec:
                rec.status = "abandoned"
                rec.error = RunNotEnded("still running when the audit writer closed")
                rec.end_time = now
                out.append(rec)
        self.abandoned += len(out)
        return out

    def forget(self) -> None:
        """In a forked child: runs in flight at the fork are the parent's to end."""
        self.runs.clear()
        self.repeats.clear()
