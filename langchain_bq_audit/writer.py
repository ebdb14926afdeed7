"""The background writer of one destination table, shared by every handler in the process.

`Writer` is the front every handler talks to, and the one place its lifecycle is written:
the bounded run queue (`submit`), the *builder* thread that drains it, `flush`, `close`,
`stats`, start and fork, and the counters. How a finished run crosses to delivery is its
`Channel`'s business, and the only thing that differs by mode:

- `ThreadChannel` (here, the default): the builder thread turns runs into rows and hands
  them to a row buffer; a *sender* thread writes batches with bounded retries (a timeout per
  request, a deadline per batch, backoff with jitter), dead-letters rows BigQuery rejects for
  good, spools what it gives up on (and everything while BigQuery is down or the buffer is
  over `max_buffer_bytes`), and replays the spool when BigQuery answers again.
- `ProcessChannel` (writer_process.py, `writer_process=True`): the builder thread pickles
  runs down a pipe to a child process that runs an ordinary `Writer`.

`submit` (the callback path) is a length check and a deque append. Shutdown is bounded:
`close(timeout)`, the atexit drain and the SIGTERM drain spool whatever is not written by
their deadline. Every row ends up counted as written, spooled, dead-lettered or dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .client import destination_id
from .pacing import KEEP_UP_RUNS, BusyWatch, Pacer
from .records import RunRecord
from .retry import Breaker
from .settings import AuditSettings
from .tracker import RunTracker

if TYPE_CHECKING:
    from .sinks.base import Sink
    from .spool import Spool

# Row building, hashing and the spool (json, regexes, zlib) are imported when a writer is
# made or its builder runs, not by `import langchain_bq_audit`: import cost is a target.

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 60.0
#: Set by the exit and SIGTERM drains (`registry.shutdown`): the process ends after them.
EXITING = threading.Event()
# What happened to the rows this writer accepted: each ends in exactly one of these four
# (or is still `queued`), so `accepted == sum(SETTLED) + queued` at every quiet point.
SETTLED = ("written", "dead_lettered", "spooled", "dropped")
# What happened to spooled rows later, by whichever process replays them (not part of the
# sum: those rows were counted `spooled` when they went to disk, maybe by another process).
REPLAY = ("replayed", "replay_dead_lettered", "corrupt_spool_records")
COUNTERS = ("accepted", *SETTLED, *REPLAY, "retried", "batches", "build_errors")

Run = RunRecord | dict[str, Any]  # a finished run, or a row built already (see `row_of`)


class Marker:
    """A request placed in the run queue behind the runs before it: `flush`, `close`,
    `stats` or `start`. The channel answers it once it has handled every run before it."""

    __slots__ = ("deadline", "done", "kind", "ok", "stats", "unwritten_before")

    def __init__(self, kind: str, timeout: float | None, unwritten_before: int) -> None:
        self.kind = kind
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.unwritten_before = unwritten_before
        self.done = threading.Event()
        self.ok = False  # what a request that is never answered (its channel died) says
        self.stats: dict[str, Any] | None = None

    def answer(self, ok: bool, stats: dict[str, Any] | None = None) -> None:
        self.ok, self.stats = ok, stats
        self.done.set()

    def left(self) -> float | None:
        """Seconds until the caller's deadline (None: no deadline)."""
        return time_left(self.deadline)


class Channel(Protocol):
    """How finished runs cross from a `Writer`'s run queue to delivery.

    `take` and `mark` are called on the writer's builder thread, in queue order; the rest
    by the writer's lifecycle methods.
    """

    destination: str
    thread_name: str  # the builder thread's name: `bq-audit-<thread_name>:<table>`
    join_cap: float  # seconds `close` waits at most for the builder thread to end
    asks_stats: bool  # `stats` sends a "stats" request behind the queued runs first
    asks_start: bool  # `ensure_started` sends a "start" request (else starting is enough)

    @property
    def spool(self) -> Spool | None: ...

    def open(self) -> None:
        """Start the channel's own threads (with the writer's lock held, before the builder)."""

    def take(self, runs: Iterator[Run]) -> None:
        """Hand runs across. `runs` pops them off the queue as they are asked for, up to
        the next request; what the channel does not take stays queued. A run in hand is
        out of `spool_memory`'s reach, so take few at a time (`ThreadChannel`: one)."""

    def mark(self, marker: Marker) -> None:
        """Answer `marker` once every run taken before it is settled (or at once)."""

    def drained(self) -> None:
        """The builder thread is stopping with nothing queued."""

    def sending(self) -> bool:
        """Rows the builder handed over are still on their way after it stopped (calls went
        on during a close): a request must go through `mark` to wait for them."""

    def give_up(self, runs: list[Run], sent: int = 0) -> int:
        """Out of time: stop sending; spool `runs` and every row held. Rows spooled.
        `sent`: how many of the first `runs` a writer process was sent and did not
        acknowledge (it may spool them too)."""

    def wait_views(self, deadline: float | None) -> None:
        """Wait, until `deadline` at most, for the views a first write started to make."""

    def close(self, deadline: float | None, idle: bool) -> bool:
        """After the builder stopped (`idle`: it never ran): release what the channel holds.
        False when something could not be written."""

    def stats(self, answer: dict[str, Any] | None) -> dict[str, Any]:
        """Counters the writer does not hold itself (added to its own), `queued` held by the
        channel, and its state (`bigquery_down`, `spool_bytes`, `last_error`, ...).
        `answer`: the reply to a "stats" request, when `asks_stats`."""

    def after_fork(self) -> None:
        """In a forked child: drop the parent's threads, connections and rows."""

    def replay_now(self, progress: Callable[[int, int], None] | None) -> int:
        """Replay the spool in the calling thread."""


class Writer:
    """One destination's writer: the run queue, the builder thread and the lifecycle
    (`ensure_started`, `flush`, `close`, `stats`, fork), over a `Channel`."""

    def __init__(
        self,
        settings: AuditSettings,
        client: Any = None,
        *,
        sink: Sink | None = None,
        destination: str | None = None,
        hand_over: bool = False,
    ) -> None:
        """A writer for `settings`' destination.

        `client`: a ready `bigquery.Client` (else one is made on first write). `sink`: any
        `Sink` to write with instead of BigQuery (no client, no provisioning; tests use
        `MemorySink`). `destination`: the `project.dataset.table` whose spool folder to use,
        when it differs from the settings' (`bq-audit replay --all`). `hand_over`: once the
        builder thread is busy (`pacing.BusyWatch`), move to a writer process
        (`writer_process` auto, where one could run; `_hand_over`).
        """
        self.settings = settings
        self._busy = BusyWatch() if hand_over else None
        self._hand_over_due = False
        self._max_queue = settings.max_queue_rows
        # pauses only well below the queue's limit (pacing.py)
        self._pacer = Pacer(keep_up=min(KEEP_UP_RUNS, settings.max_queue_rows // 2))
        self._batch_rows = settings.batch_rows
        self.tracker = RunTracker(settings.max_pending_runs, settings.run_ttl_s)
        self._sweep_every = min(settings.run_ttl_s / 4, 60.0)
        self._reset_process_state()
        self._channel = self._open_channel(client, sink, destination)
        self.destination = self._channel.destination

    def _open_channel(self, client: Any, sink: Sink | None, destination: str | None) -> Channel:
        return ThreadChannel(self, client, sink=sink, destination=destination)

    def _reset_process_state(self) -> None:
        """Fresh queue, builder and counters (at creation and in a forked child)."""
        self._records: deque[Run | Marker] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # builder start/stop, counters
        self._builder: threading.Thread | None = None
        self._stopping = False
        self._waiting = 0  # callers blocked in flush() or another request
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.last_error: str | None = None
        self._warned: dict[str, float] = {}
        self._retired: list[ThreadChannel] = []  # `_hand_over`'s: a child drops the parent's

    @property
    def spool(self) -> Spool | None:
        """This destination's spool (None with `spool_enabled=False`)."""
        return self._channel.spool

    @property
    def stopping(self) -> bool:
        """`close` has begun (the builder stops once the queue is empty)."""
        return self._stopping

    @property
    def stopped(self) -> bool:
        """`close` has begun and the builder thread has ended."""
        return self._stopping and self._builder is None

    # -- callback path ---------------------------------------------------------------------

    def submit(self, record: Run) -> None:
        """Queue a finished run. O(1); never blocks, never raises."""
        records = self._records
        with self._lock:  # uncontended: about 0.1 us; `+=` alone is not atomic across threads
            self.counters["accepted"] += 1
        if len(records) >= self._max_queue:
            self._count("dropped", 1, "in-memory queue full (max_queue_rows)")
            return
        records.append(record)
        if self._builder is None:
            self._start()
        if len(records) >= self._batch_rows and not self._wake.is_set():
            self._wake.set()

    # -- control ---------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the threads if they are not running (which replays an earlier spool)."""
        if self._channel.asks_start:
            self._request("start", None, wait=False)
        elif self._builder is None:
            self._start()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every row queued before this call is handled.

        True when all of them were written to BigQuery; False on timeout, or when some were
        spooled, dead-lettered or dropped instead (see `stats()`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        if self._builder is not None or self._records or self._channel.sending():
            ok = self._request("flush", timeout)[0]
        if self._retired:  # rows a writer thread sent before a hand-over
            ok = self._settle_retired(deadline, closing=False) and ok
        # the views a first write started (rows never wait for them): there when this returns
        # in time; they do not change the answer, which is about rows
        self._channel.wait_views(deadline)
        return ok

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued within `timeout`, spool the rest, stop the threads.

        Returns True when everything was written. The writer starts again if used again.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._abandon_pending()
        if self._builder is None and not self._records and not self._channel.sending():
            return self._channel.close(deadline, idle=True)
        ok = self._request("close", timeout)[0]
        if not ok and (deadline is None or time.monotonic() >= deadline - 0.05):
            self.spool_memory()  # out of time: the channel stops sending and spools
        with self._lock:
            self._stopping = True
        self._wake.set()
        builder = self._builder
        if builder is not None and builder is not threading.current_thread():
            cap, left = self._channel.join_cap, time_left(deadline)
            builder.join(cap if left is None else min(cap, left))
        if self._retired:
            ok = self._settle_retired(deadline, closing=True) and ok
        ok = self._channel.close(deadline, idle=False) and ok
        with self._lock:  # calls went on through the close: its builder never went quiet
            going_on = self._builder is not None and not EXITING.is_set()
            if going_on:
                self._stopping = False
        if going_on:  # write their rows, not spool them (a close out of time set abort)
            self._channel.open()
        return ok

    def spool_memory(self, runs: Iterable[Run] = (), sent: int = 0) -> int:
        """Stop sending and spool `runs` and every run and row still in memory; the number
        of rows spooled. Used when a deadline runs out. A row in flight may still reach
        BigQuery as well; the spool then holds a copy with the same event id, which dedup
        removes on read. `sent`: see `Channel.give_up`."""
        return self._channel.give_up([*runs, *self._take_queued()], sent)

    def stats(self) -> dict[str, Any]:
        """Counters, the queue and buffer sizes, spool state, the last error.

        `accepted == written + dead_lettered + spooled + dropped + queued` whenever the
        writer is quiet (after `flush`): `queued` counts runs waiting to be built or to
        cross, rows waiting to be sent and rows in flight (in a writer process too).
        """
        answer = None
        if self._channel.asks_stats and self._builder is not None:
            answer = self._request("stats", 1.0)[1]  # behind the queued runs: sent first
        held = self._channel.stats(answer)
        out: dict[str, Any] = {
            name: self.counters[name] + int(held.pop(name, 0)) for name in COUNTERS
        }
        out["accepted"] = self.counters["accepted"]  # the runs handed to this writer
        out["queued"] = sum(1 for i in list(self._records) if not isinstance(i, Marker))
        out["queued"] += int(held.pop("queued", 0))
        for old in list(self._retired):  # its batch in flight (with no spool, its rows)
            out["queued"] += int(old.stats(None)["queued"])
        out.update(held)
        out["last_error"] = held.get("last_error") or self.last_error
        return out

    def replay_now(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the spool in the calling thread (what `bq-audit replay` does)."""
        return self._channel.replay_now(progress)

    # -- builder thread --------------------------------------------------------------------

    def _request(
        self, kind: str, timeout: float | None, wait: bool = True
    ) -> tuple[bool, dict[str, Any] | None]:
        """Queue a request behind the runs already queued: (ok, stats) once the channel
        answers it, (False, None) on timeout. `ok` is False too when a row queued before
        it, or meanwhile, was spooled, dead-lettered or dropped instead of written."""
        marker = Marker(kind, timeout, self._unwritten())
        self._records.append(marker)
        if self._builder is None:
            self._start()
        self._wake.set()
        if not wait:
            return False, None
        with self._lock:
            self._waiting += 1  # the caller blocks: the builder need not pause for it
        try:
            if not marker.done.wait(timeout):
                return False, None
        finally:
            with self._lock:
                self._waiting -= 1
        return marker.ok and self._unwritten() == marker.unwritten_before, marker.stats

    def _requeue(self, runs: Sequence[Run]) -> None:
        """Put runs back at the head of the queue (a channel could not take them), and
        see that a builder takes whatever is queued."""
        self._records.extendleft(reversed(runs))
        if self._records:
            if self._builder is None:
                self._start()
            self._wake.set()

    def _take_queued(self) -> list[Run]:
        """Empty the queue: its runs; requests among them are answered False."""
        runs: list[Run] = []
        while True:
            try:
                item = self._records.popleft()
            except IndexError:
                break
            if isinstance(item, Marker):
                item.done.set()
            else:
                runs.append(item)
        return runs

    def _start(self) -> None:
        with self._lock:
            if self._builder is not None:
                return
            self._stopping = False
            name = f"bq-audit-{self._channel.thread_name}:{self.settings.table}"
            builder = threading.Thread(target=self._build_loop, name=name, daemon=True)
            try:
                self._channel.open()
                builder.start()
            except RuntimeError:  # interpreter shutting down: nothing can be started now
                return
            self._builder = builder

    def _build_loop(self) -> None:
        wait = min(self.settings.batch_age_s, self._sweep_every)
        next_sweep = time.monotonic() + self._sweep_every
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_every
                    self._sweep()
                self._build()
            except Exception as exc:  # never let the thread die: count and carry on
                self.last_error = f"writer error: {exc!r}"
                self._warn("builder", f"langchain-bq-audit builder error: {exc!r}")
            if self._stopping and not self._records:
                with self._lock:
                    # `submit` appends before it looks at `_builder`, so a row queued now
                    # is either seen here or finds `_builder` None and starts new threads;
                    # a close that found this builder still going has opened again (close)
                    if self._records or not self._stopping:
                        continue
                    self._builder = None
                self._channel.drained()
                return

    def _build(self) -> None:
        """Hand what is queued to the channel: runs in batches, requests in their place."""
        channel = self._channel
        while self._records:
            found: list[Marker] = []
            channel.take(self._popped(found))
            if found:
                channel.mark(found[0])
            if self._hand_over_due:
                self._hand_over_due = False
                self._hand_over()
                channel = self._channel

    def _hand_over(self) -> None:
        """Move from the writer thread to a writer process, on the builder thread, between
        two runs, without waiting on BigQuery: the rows built and not yet sent are spooled
        at once (with no spool, this process's sender goes on sending them), the batch in
        flight is finished by this process's sender, and the runs queued and to come cross
        to the child, which replays the spool. Once: a writer that cannot start a child
        writes in this process as before (`ProcessChannel`)."""
        from .registry import process_problem

        busy, self._busy = self._busy, None
        why = process_problem()  # a notebook's kernel may have been imported since
        if why is not None or busy is None:
            logger.debug("langchain-bq-audit: no hand-over to a writer process: %s", why)
            return
        from .writer_process import ProcessChannel

        old = self._channel
        if not isinstance(old, ThreadChannel):
            return
        try:
            new = ProcessChannel(self)
        except Exception as exc:  # its spool or in-process writer could not be made
            logger.debug("langchain-bq-audit: no hand-over to a writer process: %r", exc)
            return
        start = time.monotonic()
        spooled = old.retire()
        self._retired.append(old)  # flush waits for its sender; close closes it
        new.open()
        self._channel = new
        # what a later handler of this table is told it asked otherwise than (registry)
        self.settings = self.settings.replace(writer_process=True)
        logger.info(
            "langchain-bq-audit: the writer of %s moved to a writer process (writer_process "
            "auto): its thread used %.0f%% of a CPU here over %.0f s; the move took %.1f s%s",
            self.destination, busy.last_share * 100, busy.window_s, time.monotonic() - start,
            f", {spooled} rows spooled for it to replay" if spooled else "",
        )  # fmt: skip

    def _settle_retired(self, deadline: float | None, closing: bool) -> bool:
        """Wait, until `deadline`, for the senders of channels retired by `_hand_over`
        (their last batch, or with no spool their rows); `closing`: then close them,
        spooling what is still in memory. True when none is left sending."""
        done = True
        for old in list(self._retired):
            sent = old.wait_sent(deadline)
            done = sent and done
            if closing:
                if not sent:  # out of time (BigQuery hangs): as at any close's deadline
                    old.give_up([])
                old.close(deadline, idle=False)
                self._retired.remove(old)
        return done

    def _popped(self, found: list[Marker]) -> Iterator[Run]:
        """Runs popped off the queue's head as they are asked for, up to a request (which
        is popped and put in `found`)."""
        records = self._records
        while True:
            try:
                item = records.popleft()
            except IndexError:  # empty, or emptied by `spool_memory` meanwhile
                return
            if isinstance(item, Marker):
                found.append(item)
                return
            yield item
            self.pace()
            if self._busy is not None and self._busy.check():
                self._hand_over_due = True  # between two takes, with no run in hand
                return

    def pace(self) -> None:
        """Called by the builder thread after each unit of work: short lock holds
        (pacing.py), except while a caller waits or the writer closes."""
        if not (self._stopping or self._waiting):
            self._pacer.tick(len(self._records))

    def _sweep(self) -> None:
        self._submit_unended(self.tracker.sweep(time.time()))

    def _abandon_pending(self) -> None:
        """At close (and so at exit and SIGTERM): runs still in flight leave a row too."""
        self._submit_unended(self.tracker.abandon_all(time.time()))

    def _submit_unended(self, records: list[RunRecord]) -> None:
        """Runs that never ended, as a failed run would be: left out only by a filter
        (`keep` False), written even when sampled out (then at `sample_rate` 1)."""
        for rec in records:
            if rec.keep is False:
                continue
            if rec.keep is None:
                rec.sample_rate = 1.0
            self.submit(rec)  # counted accepted like any run

    def _after_fork_in_child(self) -> None:
        self._reset_process_state()
        self.tracker.forget()
        self._channel.after_fork()

    # -- bookkeeping -----------------------------------------------------------------------

    def _unwritten(self) -> int:
        c = self.counters
        return c["spooled"] + c["dead_lettered"] + c["dropped"]

    def _count(self, counter: str, n: int, error: str | None = None, warn: bool = True) -> None:
        with self._lock:
            self.counters[counter] += n
            if error:
                self.last_error = error
        if error and warn:
            self._warn(counter, f"langchain-bq-audit: {n} rows {counter}: {error}")

    def _warn(self, key: str, message: str) -> None:
        """Log a warning at most once a minute per kind, never once per row."""
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[key] = now
            logger.warning(message)


_VIEW_TRIES = 4  # two new processes of one table may collide making its views


def time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a `time.monotonic()` time), at least 0; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def row_of(record: Run, settings: AuditSettings) -> dict[str, Any]:
    """The row of a finished run (built with its handler's settings), not chained yet. A
    dict is a row built already (by a `ProcessChannel`, for a run it could not send)."""
    from .rows import build_row  # a dict lookup once loaded

    if isinstance(record, dict):
        return record
    return build_row(record, record.settings or settings)


class ThreadChannel:
    """The in-process channel: the builder thread builds rows into a buffer (rows, bytes,
    age) that a sender thread writes in batches; retries, spool, replay and dead letters."""

    thread_name = "build"
    join_cap = 0.2
    asks_stats = False
    asks_start = False

    def __init__(
        self,
        writer: Writer,
        client: Any = None,
        *,
        sink: Sink | None = None,
        destination: str | None = None,
    ) -> None:
        """The channel of `writer` (see `Writer` for `client`, `sink` and `destination`)."""
        settings = writer.settings
        self.settings = settings
        self._writer = writer
        self._count = writer._count
        self._warn = writer._warn
        self._batch_rows = settings.batch_rows
        self._client = client
        self._own_client = client is None
        self._given_sink = sink
        self._sink: Any = sink
        if settings.sink == "write_api" and sink is None:
            _require_write_api()
        self._provisioned = sink is not None
        # views are for readers: made once the first rows are in, beside them (`_make_views`)
        self._views_pending = sink is None and settings.auto_create and settings.auto_create_views
        self._views_thread: threading.Thread | None = None
        self.destination = destination or destination_id(settings, client)
        self._spool: Spool | None = None
        if settings.spool_enabled:
            from .spool import Spool, default_spool_dir

            root = Path(settings.spool_dir) if settings.spool_dir else default_spool_dir()
            self._spool = Spool(root, self.destination, settings.max_spool_bytes)
            try:  # found now, not during the first outage
                self._spool.check()
            except OSError as exc:
                logger.warning("langchain-bq-audit: the spool cannot be used: %s", exc)
        self._reset_process_state()

    @property
    def spool(self) -> Spool | None:
        return self._spool

    def _reset_process_state(self) -> None:
        """A fresh buffer, sender, breaker and chain (at creation and in a forked child)."""
        self._cond = threading.Condition(threading.Lock())  # the row buffer and in-flight rows
        self._rows: deque[tuple[dict[str, Any] | Marker, int]] = deque()
        self._rows_bytes = 0
        self._rows_markers = 0  # flush markers in `_rows`: they make the sender send now
        self._rows_since: float | None = None  # when the oldest unsent row was buffered
        self._inflight: list[dict[str, Any]] = []
        self._inflight_taken = False
        self._sender: threading.Thread | None = None
        self._sender_ending = False  # the sender found nothing to send and is returning
        self._generation = 0  # threads of an older generation finish their work and exit
        self._abort = threading.Event()
        self._breaker = Breaker()
        # a chain per writer and process: a forked child starts a chain of its own
        from .integrity import HashChain

        self._chain = HashChain() if self.settings.hash_chain else None
        # digests.py: signed digests of that chain (None without a digest key)
        from .digests import Digester

        self._digests = Digester.for_writer(
            self.settings, None if self._own_client else self._client
        )
        self.last_write_time: float | None = None

    # -- the lifecycle's hooks -------------------------------------------------------------

    def open(self) -> None:
        self._abort.clear()
        with self._cond:
            sender = self._sender
            if sender is not None and sender.is_alive() and not self._sender_ending:
                # still sending what the last builder left (calls went on during a close):
                # it sends the new rows too, so a request's answer follows every row before it
                return
            self._generation += 1
            self._sender_ending = False
            generation = self._generation
        sender = threading.Thread(target=self._send_loop, args=(generation,),
                                  name=f"bq-audit-send:{self.settings.table}",
                                  daemon=True)  # fmt: skip
        sender.start()
        self._sender = sender

    def mark(self, marker: Marker) -> None:
        if marker.kind not in ("flush", "close"):  # nothing to wait for
            marker.answer(True)
            return
        with self._cond:  # the sender answers it once the rows before it are settled
            self._rows.append((marker, 0))
            self._rows_markers += 1
            self._cond.notify()

    def drained(self) -> None:
        with self._cond:  # the sender may stop now
            self._cond.notify_all()

    def sending(self) -> bool:
        with self._cond:
            sender = self._sender
            return sender is not None and sender.is_alive() and not self._sender_ending

    def give_up(self, runs: list[Run], sent: int = 0) -> int:
        """Stop retrying, then move every row still in memory (`runs`, buffered, in
        flight) to the spool."""
        self._abort.set()
        with self._cond:
            rows, markers = self._take_buffer()
            if not self._inflight_taken:  # a second drain (SIGTERM, then exit) spools it once
                rows.extend(self._inflight)
                self._inflight_taken = True
        for run in runs:
            row = self._row(run)
            if row is not None:
                rows.append(row)
        exiting = bool(rows) and EXITING.is_set()
        # at exit the drop and its cause are said in the drain's one line, not a second one
        taken, why = self._to_spool(rows, warn=not exiting)
        if exiting:  # a short script's rows are not in BigQuery: say so
            # each drain's own rows, not once a minute: a SIGTERM drain the process survived
            # and the exit drain after it each leave rows of their own
            logger.warning(self._left_at_exit(len(rows), taken, min(sent, len(rows)), why))
        for marker in markers:
            marker.answer(True)
        return len(rows)

    def _left_at_exit(self, held: int, taken: int, sent: int, why: str) -> str:
        """What became of the `held` rows the exit or SIGTERM drain had no time for (`sent`
        of them also in a writer process, which says its own; `why` the rest were dropped)."""
        spool = self._spool
        said = (f"langchain-bq-audit: {held} rows for {self.destination} were not written "
                "in the time the exit drain had (shutdown_timeout_s)")  # fmt: skip
        if taken and spool is not None:
            said += (f"; {taken} are in the spool ({spool.dir}): the next process that writes "
                     "to this table replays them, or run `bq-audit replay`")  # fmt: skip
        if taken < held:
            said += f"; {held - taken} could not be spooled ({why}) and are counted as dropped"
        if sent:  # so a user adding up this line and the writer process's counts them once
            said += (f"; {sent} of them the writer process was sent but had not "
                     "acknowledged: it may write or spool them too, and count them "
                     "(one event_id each, written once)")  # fmt: skip
        if self._views_pending and self._views_thread is None:
            said += ("; the views are made after the first write (or now by "
                     "`bq-audit init`)")  # fmt: skip
        return said

    def close(self, deadline: float | None, idle: bool) -> bool:
        self.wait_views(deadline)  # a short script's views, in what is left of its time
        views = self._views_thread
        if EXITING.is_set() and views is not None and views.is_alive():
            # the exit or SIGTERM drain is out of time: the thread dies with the process
            self._warn("views-at-exit", f"langchain-bq-audit: the views of {self.destination} "
                       "were not all made in the time left at close; the rows are not "
                       "affected; make them with `bq-audit init` (the next process's writer "
                       "also makes them)")  # fmt: skip
        self._close_digests(deadline)  # every row is chained by now
        if not idle:
            with self._cond:
                self._cond.notify_all()
            sender = self._sender
            left = time_left(deadline)
            if sender is not None and sender is not threading.current_thread():
                sender.join(0.2 if left is None else min(0.2, left))
            close_sink = getattr(self._sink, "close", None)
            if close_sink is not None:  # the Write API's long-lived call; reopened if used again
                close_sink()
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.seal()
        return True

    def retire(self) -> int:
        """Stop taking rows while the writer goes on with another channel (`_hand_over`).
        The rows not yet sent go to the spool now (sealed: the next writer replays it), and
        the sender ends after its batch in flight; rows the spool cannot take (none, full,
        a disk error) stay for the sender to send first. The rows spooled."""
        from .rows import row_size
        from .spool import SpoolWriteError

        with self._cond:
            self._generation += 1  # the sender of the current generation returns
            rows, markers = self._take_buffer() if self._spool is not None else ([], [])
            self._cond.notify_all()
        taken = 0
        if rows and self._spool is not None:
            try:
                taken = self._spool.append(rows)
            except SpoolWriteError as exc:  # the disk filled up part way
                taken = exc.taken
            except OSError:  # read-only, gone: BigQuery may still take them
                pass
            with contextlib.suppress(OSError):
                self._spool.seal()
        if taken:
            self._count("spooled", taken)
        if taken < len(rows):  # back in order, for this sender before it ends
            with self._cond:
                rest = [(row, row_size(row)) for row in rows[taken:]]
                self._rows.extendleft(reversed([*rest, *((m, 0) for m in markers)]))
                self._rows_bytes += sum(size for _, size in rest)
                self._rows_markers += len(markers)
                self._rows_since = time.monotonic()
                self._cond.notify_all()
        else:
            for marker in markers:  # the rows before it are settled: spooled
                marker.answer(True)
        return taken

    def _take_buffer(self) -> tuple[list[dict[str, Any]], list[Marker]]:
        """Empty the row buffer (with `_cond` held): its rows, and the requests among them
        (for the caller to answer once the rows are settled)."""
        rows = [item for item, _ in self._rows if not isinstance(item, Marker)]
        markers = [item for item, _ in self._rows if isinstance(item, Marker)]
        self._rows.clear()
        self._rows_bytes = 0
        self._rows_markers = 0
        self._rows_since = None
        return rows, markers

    def wait_sent(self, deadline: float | None) -> bool:
        """After `retire`: wait, until `deadline`, for the sender to end. True if it did."""
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(time_left(deadline))
            return not sender.is_alive()
        return True

    def stats(self, answer: dict[str, Any] | None) -> dict[str, Any]:
        with self._cond:
            inflight = 0 if self._inflight_taken else len(self._inflight)
        queued = sum(1 for i, _ in list(self._rows) if not isinstance(i, Marker))
        return {
            "queued": queued + inflight,
            "bigquery_down": self._breaker.down,
            "spool_bytes": self._spool.size_bytes() if self._spool else 0,
            "last_error": None,  # the writer's own
            "last_write_time": self.last_write_time,
            "writer_process": None,  # rows are built and sent by this process's threads
        }

    def after_fork(self) -> None:
        self._reset_process_state()
        self._views_thread = None  # the parent's; a view it had not made is made here too
        self._sink = self._given_sink
        if self._own_client:  # never share the parent's HTTP connections
            self._client = None
        if self._spool is not None:
            self._spool.forget_after_fork()

    def replay_now(self, progress: Callable[[int, int], None] | None = None) -> int:
        self._breaker.succeeded()
        return self._replay(progress)  # which seals the open segment first

    def _close_digests(self, deadline: float | None) -> None:
        """digests.py: sign the closing digest and close the digests table's writer."""
        if self._digests is not None:
            self._digests.close(time_left(deadline))

    def _to_spool(self, rows: list[dict[str, Any]], warn: bool = True) -> tuple[int, str]:
        """Spool rows; what the spool cannot take (disabled, full, disk error) is dropped,
        with a warning unless `warn` is False. (The number spooled, why the rest were not.)"""
        if not rows:
            return 0, ""
        from .spool import SpoolWriteError

        taken = 0
        error = "spool disabled (spool_enabled=false)"
        if self._spool is not None:
            try:
                taken = self._spool.append(rows)
                error = "spool full (max_spool_bytes)"
            except SpoolWriteError as exc:  # the disk filled up part way
                taken = exc.taken
                error = f"spool write failed: {exc.cause}"
            except OSError as exc:
                error = f"spool error: {exc}"
        if taken:
            self._count("spooled", taken)
        if taken < len(rows):
            self._count("dropped", len(rows) - taken, error, warn)
        return taken, error

    # -- builder thread --------------------------------------------------------------------

    def _row(self, record: Run) -> dict[str, Any] | None:
        """The row of a finished run, built with its handler's settings, then chained.

        None (the run counted `dropped`, with the error) only when not even a minimal row
        can be made of it; `build_row` already turns content it cannot render into one.
        """
        try:
            row = row_of(record, self.settings)
            if self._chain is not None:
                self._chain.link(row)
                if self._digests is not None:  # digests.py: signs a digest when one is due
                    self._digests.observe(row)
        except Exception as exc:  # a bug, or a run we cannot read at all: count, never lose
            self._count("build_errors", 1)
            self._count("dropped", 1, f"row not built: {type(exc).__name__}: {exc}")
            return None
        return row

    def take(self, runs: Iterator[Run]) -> None:
        from .rows import row_size

        limit = self.settings.max_buffer_bytes
        spill: list[dict[str, Any]] = []
        for run in runs:
            row = self._row(run)
            if row is None:
                continue
            size = row_size(row)
            with self._cond:
                down = self._breaker.down
                if down or self._abort.is_set() or self._rows_bytes + size > limit:
                    spill.append(row)
                else:
                    self._rows.append((row, size))
                    self._rows_bytes += size
                    if self._rows_since is None:
                        self._rows_since = time.monotonic()
                    if len(self._rows) >= self._batch_rows:
                        self._cond.notify()
            if len(spill) >= self._batch_rows:
                self._to_spool(spill)
                spill = []
        self._to_spool(spill)  # rows before a marker are settled before it passes
        with self._cond:
            self._cond.notify()

    # -- sender thread ---------------------------------------------------------------------

    def _send_loop(self, gen: int) -> None:
        self._replay()  # rows an earlier process (or an earlier outage) left behind
        while True:
            batch: list[dict[str, Any]] = []
            markers: list[Marker] = []
            with self._cond:
                wait = self._send_wait()
                if wait > 0:
                    if not self._rows and (gen != self._generation or self._writer.stopped):
                        self._sender_ending = True  # `open` starts another
                        return
                    self._cond.wait(self._breaker.probe_wait if self._breaker.down else wait)
                size = 0
                due = self._send_wait() <= 0  # else go round: the wait ended early
                while due and self._rows and len(batch) < self._batch_rows:
                    item, item_size = self._rows[0]
                    if isinstance(item, Marker):
                        if batch:
                            break  # send what is before the marker first
                        self._rows.popleft()
                        self._rows_markers -= 1
                        markers.append(item)
                        continue
                    if batch and size + item_size > self.settings.batch_bytes:
                        break
                    self._rows.popleft()
                    self._rows_bytes -= item_size
                    batch.append(item)
                    size += item_size
                if batch:  # rows left behind were built during the last send: fresh enough
                    self._rows_since = time.monotonic() if self._rows else None
                self._inflight = batch
                self._inflight_taken = False
            try:
                if batch:
                    self._send_batch(batch)
                # a retired sender (`retire`) leaves the spool to the writer after it
                if (not self._writer.stopping and gen == self._generation
                        and self._breaker.probe_due()):  # fmt: skip
                    self._replay()
            except Exception as exc:  # never let the thread die
                self._writer.last_error = f"sender error: {exc!r}"
                self._warn("sender", f"langchain-bq-audit sender error: {exc!r}")
            finally:
                with self._cond:
                    self._inflight = []
                for marker in markers:
                    marker.answer(True)

    def _start_views(self) -> None:
        """After the first write: make the views in a thread of their own, so that no row
        waits for them (`flush` and `close` wait for them within their time, `wait_views`)."""
        if self._views_thread is None and self._views_pending:
            thread = threading.Thread(target=self._make_views, daemon=True,
                                      name=f"bq-audit-views:{self.settings.table}")  # fmt: skip
            self._views_thread = thread
            with contextlib.suppress(RuntimeError):  # interpreter shutting down
                thread.start()

    def _make_views(self) -> None:
        """Create or update the table's views, once per writer. Two writers of a new table
        may collide (the local BigQuery's write conflict, a reset connection): tried again a
        few times. A failure costs no row: one warning naming `bq-audit init`; a view name
        that a table holds is left alone, with a warning."""
        from .provision import ensure_views, views_left_alone, views_made
        from .retry import backoff_delays

        error: Exception | None = None
        delays = backoff_delays()  # a batch's backoff, for at most _VIEW_TRIES tries
        for attempt in range(1, _VIEW_TRIES + 1):
            try:
                states = ensure_views(self._client, self.settings,
                                      timeout=self.settings.request_timeout_s)  # fmt: skip
            except Exception as exc:
                error = exc
                if attempt < _VIEW_TRIES and not self._abort.wait(next(delays)):
                    continue
                break
            for line in views_left_alone(states):
                self._warn("views", f"langchain-bq-audit: {line}")
            error = None
            break
        # another process of the same new table may have made them while its requests collided
        if error is not None and not views_made(
            self._client, self.settings, self.settings.request_timeout_s
        ):
            self._warn("views", f"langchain-bq-audit: the views of {self.destination} were "
                       f"not made ({type(error).__name__}: {error}); the rows are written; "
                       "make them with `bq-audit init`")  # fmt: skip
        self._views_pending = False

    def wait_views(self, deadline: float | None) -> None:
        """Wait, until `deadline` at most, for views being made (see `_start_views`)."""
        thread = self._views_thread
        if thread is not None and thread is not threading.current_thread() and thread.ident:
            thread.join(time_left(deadline))

    def _send_wait(self) -> float:
        """Seconds until the buffered rows are due (0: send now). Call with `_cond` held.

        A batch goes when it is full (rows or bytes), when its oldest row has waited
        `batch_age_s`, when a flush is waiting for it, or when the writer is stopping.
        """
        if not self._rows:
            return 1.0
        if self._rows_markers or self._writer.stopping or self._abort.is_set():
            return 0.0
        if len(self._rows) >= self._batch_rows or self._rows_bytes >= self.settings.batch_bytes:
            return 0.0
        since = self._rows_since
        if since is None:
            return 0.0
        return max(0.0, since + self.settings.batch_age_s - time.monotonic())

    def _send_batch(self, batch: list[dict[str, Any]]) -> None:
        if self._abort.is_set() or not self._breaker.probe_due():
            written = False
        else:  # while down, a batch due for a probe gets one attempt
            written = self._deliver(batch, once=self._breaker.down, inflight=True)
        if not written:
            with self._cond:
                taken = self._inflight_taken  # already spooled by `spool_memory`
                rest = self._inflight  # what a partial write left of the batch
            if not taken:
                self._to_spool(rest)

    def _mark_down(self, error: str, setup: bool = False) -> None:
        self._writer.last_error = error
        if self._breaker.failed():
            if setup:  # not an outage: say what to fix, at once
                message = f"langchain-bq-audit: cannot write to {self.destination}, spooling: "
            else:
                message = "langchain-bq-audit: BigQuery unreachable, spooling: "
            self._warn("setup" if setup else "down", message + error)

    def _ensure_sink(self) -> Any:
        if self._sink is None:
            from .client import make_client
            from .provision import table_id

            if self._client is None:
                self._client = make_client(self.settings)
            table = table_id(self._client, self.settings)
            timeout = self.settings.request_timeout_s
            if self.settings.sink == "write_api":
                from .sinks.write_api import WriteApiSink

                grpc_target = self.settings.write_api_host
                self._sink = WriteApiSink(self._client, table, timeout, grpc_target)
            else:
                from .sinks.insert_all import InsertAllSink

                self._sink = InsertAllSink(self._client, table, timeout)
        if not self._provisioned and self.settings.auto_create:
            from .provision import ensure_table

            ensure_table(self._client, self.settings, timeout=self.settings.request_timeout_s,
                         retry=False, views=False)  # fmt: skip
            self._provisioned = True
        return self._sink

    def _deliver(
        self,
        rows: list[dict[str, Any]],
        *,
        replay: bool = False,
        once: bool = False,
        inflight: bool = False,
    ) -> bool:
        """Write rows with bounded retries. True when each was written or dead-lettered.

        False means BigQuery could not be reached within the batch deadline (or one attempt,
        with `once`, or shutdown cut it short), or a configuration problem stops every
        attempt: the caller keeps the rows (spools them, or leaves them spooled).
        `inflight`: `rows` are the batch in flight, which `give_up` may spool meanwhile.
        """
        from .retry import backoff_delays, setup_error
        from .sinks.base import PermanentError, RetryableError, TableMissingError

        self._writer.counters["batches"] += 1
        deadline = time.monotonic() + self.settings.batch_deadline_s
        delays = backoff_delays()
        pending = rows
        while pending:
            try:
                sink = self._ensure_sink()
                errors = sink.write(pending, [r["event_id"] for r in pending])
            except TableMissingError as exc:
                # retried like an outage: it may be being created right now (`bq-audit init`,
                # or the writer of the table that a digests table belongs to)
                self._provisioned = False
                off = "" if self.settings.auto_create else " and auto_create is off"
                error = f"table missing{off}: {exc}"
            except PermanentError as exc:
                if inflight and not self._settle_inflight([]):
                    return True  # spooled by `give_up`: dead-lettered at its replay
                self._dead_letter(pending, [str(exc)] * len(pending), replay)
                self._breaker.succeeded()
                return True
            except (RetryableError, OSError) as exc:
                error = str(exc)
                if type(exc) is OSError and (setup := setup_error(exc)) is not None:
                    self._mark_down(str(setup), setup=True)
                    return False
            except Exception as exc:  # credentials, permissions, provisioning, a bug...
                setup = setup_error(exc)
                if setup is not None:  # no retry: it fails the same way until fixed
                    self._mark_down(str(setup), setup=True)
                    return False
                error = f"{type(exc).__name__}: {exc}"
            else:
                self._breaker.succeeded()
                invalid = {i: e for i, e in errors.items() if e}
                written = len(pending) - len(errors)
                # rows 'stopped' only because a neighbour was invalid are sent again
                left = [pending[i] for i, e in errors.items() if not e]
                if inflight and not self._settle_inflight(left):
                    return True  # `give_up` spooled the batch and counted it: once
                self._count("replayed" if replay else "written", written)
                if written:
                    self.last_write_time = time.time()
                    self._start_views()
                if invalid:
                    self._dead_letter([pending[i] for i in invalid], list(invalid.values()), replay)
                pending = left
                continue
            self._writer.last_error = error
            wait = next(delays)
            if once or time.monotonic() + wait >= deadline or self._abort.is_set():
                self._mark_down(error)
                return False
            self._count("retried", len(pending))
            if self._abort.wait(wait):
                self._mark_down(error)
                return False
        return True

    def _settle_inflight(self, left: list[dict[str, Any]]) -> bool:
        """After a write of the batch in flight: False when `give_up` (a close out of time)
        has spooled it meanwhile, counted `spooled`, so its rows are not counted `written`
        or dead-lettered too (the spool's copies, replayed later, share their event ids);
        else the batch in flight becomes `left`, the rows still to send, which are all that
        a later `give_up`, or this sender when it gives up, spools."""
        with self._cond:
            if self._inflight_taken:
                return False
            self._inflight = left
            return True

    def _dead_letter(self, rows: list[dict[str, Any]], errors: list[str], replay: bool) -> None:
        """Keep rows BigQuery rejected for good; counted `dead_lettered` (`dropped` if the
        dead-letter file cannot be written), or `replay_dead_lettered` for spooled rows."""
        stored = False
        if self._spool is not None:
            try:
                self._spool.dead_letter(rows, errors)
                stored = True
            except OSError as exc:
                errors = [f"{e} (dead-letter write failed: {exc})" for e in errors]
        # a replayed row was counted once already, as spooled
        counter = "dead_lettered" if stored else "dropped"
        self._count(
            "replay_dead_lettered" if replay else counter, len(rows), f"rejected: {errors[0]}"
        )

    # -- replay ----------------------------------------------------------------------------

    def _replay(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Write spooled segments (oldest first) until done or BigQuery fails again."""
        spool = self._spool
        if spool is None:
            return 0
        from .replay import replay

        sent = replay(
            spool,
            lambda batch: self._deliver(batch, replay=True, once=self._breaker.down),
            lambda records, errors: self._dead_letter(records, errors, replay=True),
            max_rows=self._batch_rows,
            max_bytes=self.settings.batch_bytes,
            stop=lambda: self._writer.stopping or self._abort.is_set(),
            corrupt=lambda n: self._count("corrupt_spool_records", n, "torn spool record skipped"),
            progress=progress,
        )
        while spool.undeletable:  # a read-only spool: replayed, kept, never sent again here
            path, why = spool.undeletable.pop()
            error = f"replayed spool segment {path} cannot be removed: {why}"
            self._writer.last_error = error
            self._warn("undeletable", f"langchain-bq-audit: {error}; this process will not "
                                      "send it again; remove it by hand")  # fmt: skip
        return sent


def _require_write_api() -> None:
    missing = [m for m in ("pyarrow", "google.cloud.bigquery_storage_v1") if not _has(m)]
    if missing:
        raise ImportError(
            f"sink='write_api' needs {' and '.join(missing)}: "
            "pip install 'langchain-bq-audit[write-api]'"
        )


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False
