"""The background writer: one thread per process and destination, shared by its handlers.

`submit` is the only method on the callback path: a length check and a deque append.
The thread wakes when a batch is full, when the oldest queued row reaches the batch age,
or on flush/close; it builds rows, batches them by count and bytes, and writes them with
bounded retries. Every outcome is counted in `stats()`.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from typing import Any

from .records import RunRecord
from .rows import build_row, row_size
from .settings import AuditSettings

logger = logging.getLogger(__name__)

_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0


class _Marker:
    """Placed in the queue by `flush`; done once every row before it has been handled."""

    __slots__ = ("done", "losses_before")

    def __init__(self, losses_before: int) -> None:
        self.done = threading.Event()
        self.losses_before = losses_before


class Writer:
    """Queue, batching, retries, flush and close for one destination table."""

    def __init__(self, settings: AuditSettings, client: Any = None) -> None:
        self.settings = settings
        self._client = client
        self._own_client = client is None
        self._sink: Any = None
        self._provisioned = False
        self._max_queue = settings.max_queue_rows
        self._batch_rows = settings.batch_rows
        self._trackers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._sweep_every = min(settings.run_ttl_s / 4, 60.0)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Fresh queue, thread state and counters (at creation and in a forked child)."""
        self._queue: deque[RunRecord | _Marker] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "written", "failed", "dropped", "retried", "batches", "build_errors"),
            0,
        )
        self.last_error: str | None = None
        self.last_write_time: float | None = None

    # -- callback path ---------------------------------------------------------------------

    def submit(self, record: RunRecord) -> None:
        """Queue a finished run. O(1); never blocks, never raises."""
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._lose("dropped", 1, "queue full")
            return
        queue.append(record)
        if self._thread is None:
            self._start()
        if len(queue) >= self._batch_rows and not self._wake.is_set():
            self._wake.set()

    def add_tracker(self, tracker: Any) -> None:
        """Sweep `tracker` (an object with `sweep(now) -> [RunRecord]`) for abandoned runs.

        Held weakly; the writer thread calls it every `run_ttl_s / 4` (at most every 60 s).
        """
        self._trackers.add(tracker)
        if self._thread is None:
            self._start()

    # -- control ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row queued before this call is handled; True if none was lost."""
        if self._thread is None and not self._queue:
            return True
        marker = _Marker(self._losses())
        self._queue.append(marker)
        if self._thread is None:
            self._start()
        self._wake.set()
        if not marker.done.wait(timeout):
            return False
        return self._losses() == marker.losses_before

    def close(self, timeout: float | None = 10.0) -> bool:
        """Drain the queue and stop the thread within `timeout`. The writer restarts on use."""
        thread = self._thread
        if thread is None:
            return not self._queue
        ok = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        thread.join(0.5 if timeout is None else max(0.0, min(timeout, 0.5)))
        return ok

    def stats(self) -> dict[str, Any]:
        """Counters: accepted, written, failed, dropped, retried, batches, queued, last_error."""
        out: dict[str, Any] = dict(self.counters)
        out["queued"] = sum(1 for item in list(self._queue) if not isinstance(item, _Marker))
        out["last_error"] = self.last_error
        out["last_write_time"] = self.last_write_time
        return out

    # -- internals -------------------------------------------------------------------------

    def _losses(self) -> int:
        c = self.counters
        return c["failed"] + c["dropped"]

    def _lose(self, counter: str, n: int, why: str) -> None:
        with self._lock:
            self.counters[counter] += n
            self.last_error = why

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(
                target=self._run, name=f"bq-audit-writer:{self.settings.table}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: nothing can be started now
                return
            self._thread = thread

    def _run(self) -> None:
        wait = min(self.settings.batch_age_s, self._sweep_every)
        next_sweep = time.monotonic() + self._sweep_every
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_every
                    self._sweep()
                self._drain()
            except Exception as exc:  # never let the thread die: count and carry on
                self.last_error = f"writer error: {exc!r}"
                logger.warning("langchain-bq-audit writer error: %r", exc)
            if self._stopping and not self._queue:
                with self._lock:
                    # `submit` appends before it looks at `_thread`, so a row queued now
                    # is either seen here or finds `_thread` None and starts a new thread.
                    if self._queue:
                        continue
                    self._thread = None
                    self._stopping = False
                    return

    def _sweep(self) -> None:
        now = time.time()
        for tracker in list(self._trackers):
            for record in tracker.sweep(now):
                self._queue.append(record)

    def _drain(self) -> None:
        queue = self._queue
        settings = self.settings
        max_rows, max_bytes = settings.batch_rows, settings.batch_bytes
        while queue:
            rows: list[dict[str, Any]] = []
            markers: list[_Marker] = []
            size = 0
            while queue and len(rows) < max_rows and size < max_bytes:
                item = queue.popleft()
                if isinstance(item, _Marker):
                    markers.append(item)
                    continue
                self.counters["accepted"] += 1
                row = build_row(item, settings)
                rows.append(row)
                size += row_size(row)
            if rows:
                self._write_batch(rows)
            for marker in markers:
                marker.done.set()

    def _ensure_sink(self) -> Any:
        if self._sink is None:
            from .client import make_client
            from .provision import table_id
            from .sinks.insert_all import InsertAllSink

            if self._client is None:
                self._client = make_client(self.settings)
            self._sink = InsertAllSink(
                self._client,
                table_id(self._client, self.settings),
                self.settings.request_timeout_s,
            )
        if not self._provisioned and self.settings.auto_create:
            from .provision import ensure_table

            ensure_table(self._client, self.settings, timeout=self.settings.request_timeout_s)
            self._provisioned = True
        return self._sink

    def _write_batch(self, rows: list[dict[str, Any]]) -> None:
        """Write one batch with bounded retries; count what is written and what is lost."""
        from .sinks.base import PermanentError, RetryableError, TableMissingError

        self.counters["batches"] += 1
        deadline = time.monotonic() + self.settings.batch_deadline_s
        backoff = _BACKOFF_FIRST_S
        pending = rows
        while pending:
            try:
                sink = self._ensure_sink()
                errors = sink.write(pending, [r["event_id"] for r in pending])
            except TableMissingError as exc:
                self._provisioned = False
                error = f"table missing: {exc}"
            except PermanentError as exc:
                self._lose("failed", len(pending), f"permanent error: {exc}")
                logger.warning("langchain-bq-audit: %d rows rejected: %s", len(pending), exc)
                return
            except (RetryableError, OSError) as exc:
                error = str(exc)
            except Exception as exc:  # client construction, provisioning, credentials...
                error = f"{type(exc).__name__}: {exc}"
            else:
                invalid = {i: e for i, e in errors.items() if e}
                written = len(pending) - len(errors)
                self.counters["written"] += written
                if written:
                    self.last_write_time = time.time()
                if invalid:
                    first = next(iter(invalid.values()))
                    self._lose("failed", len(invalid), f"row rejected: {first}")
                    logger.warning("langchain-bq-audit: %d rows rejected: %s", len(invalid), first)
                # rows 'stopped' only because a neighbour was invalid are sent again
                pending = [pending[i] for i, e in errors.items() if not e]
                continue
            self.last_error = error
            wait = backoff * (0.5 + random.random())  # jitter spreads retries of many writers
            if time.monotonic() + wait >= deadline or (self._stopping and self._deadline_hit()):
                self._lose("failed", len(pending), f"gave up after retries: {error}")
                logger.warning("langchain-bq-audit: %d rows not written: %s", len(pending), error)
                return
            self.counters["retried"] += 1
            time.sleep(wait)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _deadline_hit(self) -> bool:
        return _shutdown_deadline is not None and time.monotonic() >= _shutdown_deadline


# -- one writer per process and destination ---------------------------------------------------

_writers: dict[tuple[Any, ...], Writer] = {}
_registry_lock = threading.Lock()
_shutdown_deadline: float | None = None
_atexit_registered = False


def get_writer(settings: AuditSettings, client: Any = None) -> Writer:
    """The shared writer for `settings`' destination (and `client`, when one is given)."""
    key = (*settings.destination, id(client) if client is not None else None)
    writer = _writers.get(key)
    if writer is not None:
        return writer
    with _registry_lock:
        writer = _writers.get(key)
        if writer is None:
            writer = Writer(settings, client)
            _writers[key] = writer
            if client is not None:
                # the key holds id(client): forget the writer's slot when the client dies
                weakref.finalize(client, _writers.pop, key, None)
            _register_atexit()
    return writer


def all_writers() -> list[Writer]:
    """Every writer of this process."""
    return list(_writers.values())


def shutdown(timeout: float) -> bool:
    """Flush and stop every writer within `timeout` seconds in total."""
    global _shutdown_deadline
    _shutdown_deadline = time.monotonic() + timeout
    ok = True
    for writer in all_writers():
        remaining = max(0.0, _shutdown_deadline - time.monotonic())
        ok = writer.close(remaining) and ok
    return ok


def _atexit_drain() -> None:
    timeouts = [w.settings.shutdown_timeout_s for w in all_writers()]
    if timeouts:
        shutdown(max(timeouts))


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_atexit_drain)
        _atexit_registered = True


def _after_fork_in_child() -> None:
    # The child's copies of the parent's queued rows belong to the parent, which writes
    # them; the child starts empty, with its own thread on first use.
    global _registry_lock
    _registry_lock = threading.Lock()
    for writer in _writers.values():
        writer._reset_process_state()
        writer._sink = None
        if writer._own_client:  # never share the parent's HTTP connections
            writer._client = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
