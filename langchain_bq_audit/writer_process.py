"""The writer in a process of its own (`writer_process=True`).

Building rows, hashing, JSON and HTTP cost the writer CPU time, and in one process that
time is taken under the application's GIL: with long prompts it exceeds the cost of a fast
model call. Here the application keeps the callback path (a deque append) and a *feeder*
thread that pickles finished runs in batches down a pipe: about 7 us a small run, against
45 us to build, chain and encode its row, and a history shared by a batch's runs is
pickled once. The child process runs
an ordinary `Writer` (batching, retries, spool, replay, dead letters, the hash chain) and
answers each batch with its counters.

What cannot cross keeps its row: a run whose objects cannot be pickled is built into a row
here and sent as the row; objects of classes from `__main__` (which the child cannot
import) are sent as their JSON form; errors as their type's name and message. A child that
dies is started again: the batches it had not acknowledged are sent again, and the rows it
held are counted as dropped. The child drains and exits when the application's end of the
pipe closes, even if the application was killed. A child told to close, or whose pipe was
closed, is sent nothing more: runs that arrive meanwhile (calls go on during a `close()`)
wait for its end and go to the next child, so no batch is both spooled by the close and
written by a child. If no child can be started, the rows are
written by a writer thread in this process, as without this option.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import operator
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO
from uuid import UUID

from .records import RunRecord
from .registry import get_writer
from .rows import error_text, new_event_id, run_status, to_jsonable
from .settings import AuditSettings
from .writer import (
    COUNTERS,
    EXITING,
    SETTLED,
    Channel,
    Marker,
    Run,
    Writer,
    row_of,
    time_left,
)

if TYPE_CHECKING:
    from .sinks.base import Sink
    from .spool import Spool

_HEADER = struct.Struct("<I")
# Run ids cross as ints (a UUID pickles through Python code), errors as name and message.
_REST = tuple(
    s for s in RunRecord.__slots__
    if s not in ("owner", "run_id", "parent_run_id", "trace_id", "error", "status")
)  # fmt: skip
_get_rest = operator.attrgetter(*_REST)
# Runs pickled in one call: about 0.1 ms of the lock (6 us a small run), so the feeder's
# pacing (pacing.py) falls between pickles; a batch of 500 in one call held it for 3 ms (the
# p99 of a tight loop). 16 against 64, side by side in two runs: a tight `invoke` loop's
# p99 2.03-2.22x against 2.67-2.95x the no-op's, `ainvoke` and p50 within noise. A batch
# still crosses in one write: each write releases the lock, and a thread that released it
# waits up to the switch interval (5 ms) to get it back from a busy application.
FEED_RUNS = 16
_FULL_STATS_S = 0.5  # a batch's ack carries the child's sizes at most this old
_QUICK_DEATH_S = 10.0  # a child that dies sooner than this after its start...
_MAX_QUICK_DEATHS = 3  # ...this many times in a row is not started again
_ENDING_GRACE_S = 5.0  # a child told to close ends within its close's time and this


# -- the pipe: length-prefixed pickles --------------------------------------------------------


def _send(stream: BinaryIO, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:  # unbuffered: a forked child's copy holds no half-written message
        view = view[stream.write(view) or 0 :]


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    parts = []
    while size:
        part = stream.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _receive(stream: BinaryIO) -> tuple[Any, ...] | None:
    """The next message, or None at the end of the pipe."""
    head = _read_exact(stream, _HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = _read_exact(stream, size)
    if len(data) < size:
        return None
    message: tuple[Any, ...] = pickle.loads(data)
    return message


# -- what crosses: runs, errors, objects the child cannot import ------------------------------


def _record(
    ids: tuple[Any, Any, Any], error: BaseException | None, status: str, rest: tuple[Any, ...]
) -> RunRecord:
    rec = RunRecord.__new__(RunRecord)
    rec.run_id, rec.parent_run_id, rec.trace_id = (
        UUID(int=i) if type(i) is int else i for i in ids
    )
    rec.error = error  # as `_error` rebuilt it
    rec.status = status
    for name, value in zip(_REST, rest, strict=True):
        setattr(rec, name, value)
    rec.owner = None  # the handler stays in the application; `settings` crossed
    return rec


def _reduce_record(rec: RunRecord) -> tuple[Any, ...]:
    ids = tuple(i.int if type(i) is UUID else i for i in (rec.run_id, rec.parent_run_id,
                                                             rec.trace_id))  # fmt: skip
    # the error crosses as its name and message (`reducer_override`), so a cancellation is
    # told here, where its type is still known
    if rec.event_id is None:  # given here, so a copy built in this process has the same id
        rec.event_id = new_event_id()
    return _record, (ids, rec.error, run_status(rec), _get_rest(rec))


_error_types: dict[str, type[Exception]] = {}


def _error(type_name: str, message: str) -> Exception:
    """An exception whose type has the original's name: rows keep `error_type` and text."""
    kind = _error_types.get(type_name)
    if kind is None:
        kind = _error_types.setdefault(type_name, type(type_name, (Exception,), {}))
    return kind(message)


def _same(value: Any) -> Any:
    return value


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is RunRecord:
            return _reduce_record(obj)
        if isinstance(obj, BaseException):  # many cannot be rebuilt from their args
            return _error, (kind.__name__, error_text(obj))
        if kind.__module__ == "__main__":  # a script's or notebook's class: not importable
            return _same, (to_jsonable(obj),)
        return NotImplemented


def _dumps(items: list[Any]) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(items)
    return buffer.getvalue()


# -- the application's side ----------------------------------------------------------------------


def interpreter_problem() -> str | None:
    """Why this process cannot start a writer process with `sys.executable`, or None."""
    executable = os.path.basename(sys.executable or "").lower()
    if getattr(sys, "frozen", False) or not executable.startswith(("python", "pypy")):
        # a frozen app or an embedding server would start another copy of itself
        return f"sys.executable {sys.executable!r} is not a Python interpreter"
    return None


class ProcessWriter(Writer):
    """A `Writer` whose runs cross to a writer in a child process (`ProcessChannel`)."""

    def __init__(self, settings: AuditSettings) -> None:
        super().__init__(settings)

    def _open_channel(self, client: Any, sink: Sink | None, destination: str | None) -> Channel:
        return ProcessChannel(self)


class ProcessChannel:
    """The feeder (the writer's builder thread) pickles runs in batches to a child process
    running an ordinary `Writer`; a reader thread takes its answers."""

    thread_name = "feed"
    join_cap = 0.5
    asks_stats = True
    asks_start = True  # the child is started on the feeder thread, never in a callback

    def __init__(self, writer: Writer) -> None:
        self.settings = writer.settings
        self._writer = writer
        self._count = writer._count
        self._warn = writer._warn
        self._child_settings = self.settings.replace(writer_process=False)
        # In-process writer for warnings, for rows when no child can be had, and for the
        # spool when a deadline runs out; its threads start only if it gets rows.
        self._local = Writer(self._child_settings)
        self.destination = self._local.destination
        self._reset_process_state()

    @property
    def spool(self) -> Spool | None:
        return self._local.spool  # the child's folder too

    def _reset_process_state(self) -> None:
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)  # a child's end was handled
        self._proc: subprocess.Popen[bytes] | None = None
        # the child told to close and when it must have ended: it reads no more batches
        self._closing: subprocess.Popen[bytes] | None = None
        self._closing_until: float | None = None
        self._close_seq = 0  # the last close message's number
        self._drained_ok = True  # the last child told to close wrote all it had (or unsaid)
        self._to_child: BinaryIO | None = None
        self._from_child: BinaryIO | None = None
        self._started_at = 0.0
        self._quick_deaths = 0
        self._local_used = False
        self._seq = 0
        self._unacked: dict[int, list[Any]] = {}  # batches sent, not yet read by the child
        self._waiting: dict[int, Marker] = {}
        self._child: dict[str, Any] = {}  # the child's last counters
        self._earlier: dict[str, int] = dict.fromkeys(COUNTERS, 0)  # of children that ended

    # -- the lifecycle's hooks -------------------------------------------------------------

    def open(self) -> None:
        """Nothing to start: the child is started by the first run or request."""

    def take(self, runs: Iterator[Run]) -> None:
        batch = list(itertools.islice(runs, self.settings.batch_rows))
        if not batch:
            return
        if not self._closing_child_ended() or not self._child_ready():
            self._local_used = True
            for run in batch:
                self._local.submit(run)
            return
        blobs = []
        for start in range(0, len(batch), FEED_RUNS):
            if start:
                self._writer.pace()
            chunk = batch[start : start + FEED_RUNS]
            try:
                blobs.append(_dumps(chunk))
            except Exception:  # a run holds what cannot be pickled: it crosses as its row
                batch[start : start + FEED_RUNS] = chunk = [self._picklable(r) for r in chunk]
                blobs.append(_dumps(chunk))
        self._seq += 1
        seq = self._seq
        self._unacked[seq] = batch
        if not self._post(("batch", seq, blobs)):
            with self._lock:  # the child is gone: if its end was handled, requeue here
                if self._proc is None and self._unacked.pop(seq, None) is not None:
                    self._writer._requeue(batch)

    def mark(self, marker: Marker) -> None:
        if marker.kind == "start":
            self._child_ready()  # which replays the spool
            marker.answer(True)
            return
        left = marker.left()
        # a child told to close answers nothing more: wait for its end, and its drain's word
        ended = self._closing_child_ended(None if left is None else time.monotonic() + left)
        proc = None if self._proc is self._closing else self._proc
        if marker.kind == "close":  # the batches after it are for the next child
            self._close_seq = self._seq + (proc is not None)
            self._closing_child(proc, left)
        if proc is None:  # none to ask
            ok, self._drained_ok = ended and self._drained_ok, True  # said once
            if self._local_used and marker.kind == "flush":  # rows went to the local writer
                ok = self._local.flush(left) and ok
            marker.answer(ok)
            return
        self._seq += 1
        self._waiting[self._seq] = marker
        # "exit": the close of the application's exit or SIGTERM drain, said as such there
        kind = "exit" if marker.kind == "close" and EXITING.is_set() else marker.kind
        # what is left for the child, less a margin for its answer to get back in time
        if not self._post((kind, self._seq, None if left is None else max(0.0, left - 0.2))):
            self._waiting.pop(self._seq, None)
            marker.done.set()  # answered False

    def wait_views(self, deadline: float | None) -> None:
        """Nothing to wait for here: the child makes the views, and its own `flush` (which
        answers this writer's) waits for them."""

    def sending(self) -> bool:
        return self._proc is not None  # a child told to close is still draining

    def drained(self) -> None:
        stream, self._to_child = self._to_child, None
        if stream is not None:  # the child drains and exits when its pipe closes
            settings = self._child_settings  # its drain's time (`main`)
            self._closing_child(self._proc, max(settings.shutdown_timeout_s,
                                                settings.batch_deadline_s))  # fmt: skip
            with contextlib.suppress(OSError):
                stream.close()

    def give_up(self, runs: list[Run], sent: int = 0) -> int:
        """Runs the child has not read, and `runs`, go to the spool from here."""
        return self._spool_unacked(runs)

    def _spool_unacked(self, runs: list[Run], before: int | None = None) -> int:
        """Spool `runs` and the batches the child has not acknowledged (those sent before
        message `before`); the number spooled."""
        unacked = self._take_unacked(before)
        rest = unacked + runs
        if not rest:
            return 0
        self._local_used = True
        return self._local.spool_memory(rest, len(unacked))

    def close(self, deadline: float | None, idle: bool) -> bool:
        if idle:
            return True
        ok = True
        # Batches sent before the close that the child had not acknowledged (its close ran
        # out of time); not a later child's, started for runs after the close: it writes them.
        if self._spool_unacked([], before=self._close_seq):
            ok = False
        if self._local_used:
            ok = self._local.close(time_left(deadline)) and ok
        return ok

    def stats(self, answer: dict[str, Any] | None) -> dict[str, Any]:
        """The child's counters and queue (its answer, or its last one), of the children
        that ended, and of the local writer; `accepted` is the application's writer's."""
        child = answer or self._child
        out: dict[str, Any] = {
            name: self._earlier[name] + int(child.get(name, 0))
            for name in COUNTERS
            if name != "accepted"
        }
        queued = sum(len(b) for b in list(self._unacked.values()))
        out["queued"] = queued + int(child.get("queued", 0))
        out["bigquery_down"] = bool(child.get("bigquery_down", False))
        out["spool_bytes"] = int(child.get("spool_bytes", 0))
        out["last_error"] = child.get("last_error")
        out["last_write_time"] = child.get("last_write_time")
        out["writer_process"] = self._proc.pid if self._proc is not None else None
        out["handed_over"] = int(child.get("received", 0))  # runs the current child has read
        if self._local_used:
            local = self._local.stats()
            for name in (*COUNTERS, "queued"):
                if name != "accepted":  # counted by the application's writer already
                    out[name] += local[name]
            out["spool_bytes"] = max(out["spool_bytes"], local["spool_bytes"])  # one folder
        return out

    def after_fork(self) -> None:
        # the pipe and the child belong to the parent: close our copies, start afresh
        streams = (self._to_child, self._from_child)
        self._reset_process_state()
        for stream in streams:
            if stream is not None:  # unbuffered: closing our copy sends nothing
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        self._local._after_fork_in_child()

    def replay_now(self, progress: Callable[[int, int], None] | None = None) -> int:
        return self._local.replay_now(progress)

    # -- feeder thread ---------------------------------------------------------------------

    def _take_unacked(self, before: int | None = None) -> list[Any]:
        """The batches the child has not read (sent before message `before`), in order."""
        items: list[Any] = []
        for seq in sorted(self._unacked):
            if before is not None and seq > before:
                break
            items.extend(self._unacked.pop(seq, ()))
        return items

    def _post(self, message: tuple[Any, ...]) -> bool:
        stream = self._to_child
        if stream is None:
            return False
        try:
            _send(stream, message)
        except (OSError, ValueError):  # the child died; its reader handles what it lost
            return False
        return True

    def _picklable(self, item: Any) -> Any:
        try:
            _dumps([item])
        except Exception as exc:
            self._warn("unpicklable", f"langchain-bq-audit: rows built in-process: {exc!r}")
            return row_of(item, self._child_settings)
        return item

    # -- the child process -----------------------------------------------------------------

    def _closing_child(self, proc: subprocess.Popen[bytes] | None, left: float | None) -> None:
        """`proc` was told to close (or its pipe was closed) and has `left` seconds for it:
        it reads no more batches (it would not write them, and the next child would get
        them again), nor requests."""
        self._closing = proc
        self._closing_until = None if left is None else time.monotonic() + left
        self._drained_ok = True  # until its last answer or its end says otherwise

    def _closing_child_ended(self, deadline: float | None = None) -> bool:
        """Wait for the end of a child told to close, for as long as its close may take
        (and until `deadline`); False if it has not ended by then."""
        closing = self._closing
        if closing is None or self._proc is not closing:
            return True
        until = None if self._closing_until is None else self._closing_until + _ENDING_GRACE_S
        if deadline is not None:
            until = deadline if until is None else min(until, deadline)
        with self._ended:
            return self._ended.wait_for(lambda: self._proc is not closing, time_left(until))

    def _child_ready(self) -> bool:
        """A running child, started if needed; False when none can be had."""
        if self._proc is not None:
            return True
        if self._quick_deaths >= _MAX_QUICK_DEATHS:
            return False
        try:
            self._spawn()
        except Exception as exc:
            self._quick_deaths = _MAX_QUICK_DEATHS
            self._warn("spawn", "langchain-bq-audit: no writer process, writing from this "
                                f"process instead: {exc!r}")  # fmt: skip
            return False
        return True

    def _spawn(self) -> None:
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(problem)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what the app imports
        argv = [sys.executable, "-m", "langchain_bq_audit.writer_process",
                str(to_child_r), str(from_child_w)]  # fmt: skip
        try:
            # its own session: a Ctrl-C or a group's signal is the application's to handle
            proc = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w), env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        to_child = os.fdopen(to_child_w, "wb", buffering=0)
        from_child = os.fdopen(from_child_r, "rb", buffering=0)
        self._proc, self._to_child, self._started_at = proc, to_child, time.monotonic()
        self._from_child = from_child
        self._post(("settings", 0, self._child_settings))
        name = f"bq-audit-read:{self.settings.table}"
        reader = threading.Thread(
            target=self._read_loop, args=(proc, from_child), name=name, daemon=True
        )
        reader.start()

    def _read_loop(self, proc: subprocess.Popen[bytes], stream: BinaryIO) -> None:
        with stream:
            while True:
                try:
                    message = _receive(stream)
                except Exception:
                    message = None
                if message is None:
                    break
                kind, seq, answer = message
                if kind == "ack":
                    self._unacked.pop(seq, None)
                    self._child = answer
                elif kind == "unreadable":  # the child could not unpickle it: send rows
                    batch = self._unacked.pop(seq, None)
                    if batch:
                        self._warn("unreadable", "langchain-bq-audit: rows built in-process: "
                                                 f"{answer}")  # fmt: skip
                        try:
                            rows = [row_of(item, self._child_settings) for item in batch]
                        except Exception as exc:  # build_row does not raise; be sure
                            self._count("dropped", len(batch), f"rows not built: {exc!r}")
                            continue
                        self._writer._requeue(rows)
                elif kind == "done":
                    request = self._waiting.pop(seq, None)
                    ok, stats = answer
                    self._child = stats
                    if seq == 0:  # after the drain its closed pipe asked for
                        self._drained_ok = ok
                    if request is not None:
                        request.answer(ok, stats)
        self._child_ended(proc)

    def _child_ended(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            code: int | None = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        with self._lock:
            if self._proc is not proc:
                return
            self._proc = None
            stream, self._to_child = self._to_child, None
            child, self._child = self._child, {}
            for name in COUNTERS:
                self._earlier[name] += int(child.get(name, 0))
            # batches it had not read are still here: they go to the next child
            self._writer._requeue(self._take_unacked())
            self._ended.notify_all()
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
        for request in list(self._waiting.values()):
            request.done.set()  # answered False
        self._waiting.clear()
        if code != 0:  # rows it had read but not settled are gone with it
            if proc is self._closing:
                self._drained_ok = False
            held = int(child.get("received", 0)) - _settled(child)
            error = f"writer process ended with code {code}"
            if held > 0:
                self._count("dropped", held, error)
            else:
                self._writer.last_error = error
            quick = time.monotonic() - self._started_at < _QUICK_DEATH_S
            self._quick_deaths = self._quick_deaths + 1 if quick else 0


def _settled(counters: dict[str, Any]) -> int:
    """Rows a child has done with: written, spooled, rejected or dropped (not replays)."""
    return sum(int(counters.get(name, 0)) for name in SETTLED)


# -- the child's side -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Run a writer fed by the pipe on fds `argv[0]` (in) and `argv[1]` (out)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the application decides when we stop
    inp = os.fdopen(int(argv[0]), "rb", buffering=0)
    out = os.fdopen(int(argv[1]), "wb", buffering=0)
    with inp, out:
        first = _receive(inp)
        if first is None or first[0] != "settings":
            return 2
        writer = get_writer(first[2])  # with the exit and SIGTERM drains
        assert isinstance(writer, Writer)
        writer.ensure_started()
        received = 0

        def answer(kind: str, seq: int, value: Any) -> None:
            with contextlib.suppress(OSError, ValueError):
                _send(out, (kind, seq, value))

        full: dict[str, Any] = {}
        full_at = -_FULL_STATS_S

        def stats(fresh: bool = True) -> dict[str, Any]:
            """The writer's stats; with `fresh` False (a batch's ack) the counters are
            current but the sizes (`queued`, `spool_bytes`: a scan of the queue, the buffer
            and the spool folder) at most `_FULL_STATS_S` old: a long backlog would make
            every ack scan it."""
            nonlocal full, full_at
            now = time.monotonic()
            if fresh or now - full_at >= _FULL_STATS_S:
                full, full_at = writer.stats(), now
                counters = dict(full)
            else:
                counters = {**full, **writer.counters}
            counters["received"] = received
            return counters

        while True:
            message = _receive(inp)
            if message is None:
                break  # the application closed the pipe or died: drain, as at exit
            kind, seq, arg = message
            if kind == "batch":
                try:
                    items = [item for blob in arg for item in pickle.loads(blob)]
                except Exception as exc:
                    answer("unreadable", seq, repr(exc))
                    continue
                for item in items:
                    writer.submit(item)
                received += len(items)
                writer._wake.set()  # a batch already: build it now
                answer("ack", seq, stats(fresh=False))
            elif kind == "flush":
                ok = writer.flush(arg)
                answer("done", seq, (ok, stats()))
            elif kind == "stats":
                answer("done", seq, (True, stats()))
            elif kind in ("close", "exit"):
                if kind == "exit":
                    EXITING.set()
                ok = writer.close(arg)
                answer("done", seq, (ok, stats()))
                return 0
        # The application is gone (exit, or even kill -9) and nobody waits for us: take as
        # long as one batch may (the first write may also create the table), then spool.
        settings = writer.settings
        EXITING.set()  # what this drain cannot write is said as at an application's exit
        ok = writer.close(max(settings.shutdown_timeout_s, settings.batch_deadline_s))
        answer("done", 0, (ok, stats()))  # to an application still reading: its counters
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
