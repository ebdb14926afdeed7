"""A sink that keeps rows in memory: the seam for pipeline tests without BigQuery.

It implements `Sink` like the real sinks do, with insertAll's semantics (a repeated
insert id is written once), and fails on demand the way BigQuery does: every request
(`fail_with`, e.g. a `RetryableError` for an outage), the next `n` requests, or single
rows (`reject`). It is a sink, not a mock: the writer under test runs unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class MemorySink:
    """Rows by insert id, in the order first written; requests as sent."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.requests: list[list[dict[str, Any]]] = []  # every batch that reached `write`
        self.fail_with: BaseException | None = None  # raised by every request while set
        self.fail_next: list[BaseException] = []  # raised by the next requests, in order
        self.reject: Callable[[dict[str, Any]], str | None] = lambda row: None
        self.gate = threading.Event()  # cleared: `write` waits until it is set again
        self.gate.set()
        self._lock = threading.Lock()

    def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
        """Keep `rows` (a repeated id once); raise or reject as set up. See `Sink.write`."""
        self.gate.wait()
        with self._lock:
            self.requests.append(list(rows))
            if self.fail_next:
                raise self.fail_next.pop(0)
            if self.fail_with is not None:
                raise self.fail_with
            errors = {i: why for i, row in enumerate(rows) if (why := self.reject(row))}
            if errors:  # as insertAll: one invalid row stops the rest of the request
                return {i: errors.get(i, "") for i in range(len(rows))}
            for row, insert_id in zip(rows, ids, strict=True):
                self.rows.setdefault(insert_id, row)
            return {}
