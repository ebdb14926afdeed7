"""How the builder thread shares the interpreter lock with the application.

CPython hands the lock to a waiting thread only when its holder blocks or after the switch
interval (5 ms): a builder that holds it through a batch of rows stalls the application's
next call by up to 5 ms at a time, which is what a tight loop of quick calls sees as its p99,
and an async application after each of its many short waits. So the builder works in short
slices and, between them, sleeps briefly: a sleep releases the lock, and a thread waiting for
it takes it at once. The sleep costs the builder wall time (about a fifth of its speed when
nothing else runs), not CPU.

No pause while a caller waits in `flush()` or the writer is closing (the application is
not running then), nor while the backlog is long: an application that never leaves the
lock free would otherwise keep the builder from ever catching up, and the queue would reach
`max_queue_rows` and drop runs. Then it takes the lock as CPython gives it, as before.

However short the slices, the builder's CPU is the application's: a writer on auto that
keeps busy (`BusyWatch`) hands over to a writer process (`Writer._hand_over`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SLICE_S = 0.0005  # builder work between pauses, seconds
PAUSE_S = 0.00005  # one pause; Linux makes it about 140 us (timer slack, wake-up)
KEEP_UP_RUNS = 2000  # runs queued from which the builder stops pausing


class Pacer:
    """Call `tick(backlog)` after each unit of work: it sleeps `pause_s` once `slice_s` of
    work has passed since the last pause, unless `backlog` (runs still queued) is at least
    `keep_up`. Returns whether it paused."""

    def __init__(
        self,
        slice_s: float = SLICE_S,
        pause_s: float = PAUSE_S,
        keep_up: int = KEEP_UP_RUNS,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._slice = slice_s
        self._pause = pause_s
        self._keep_up = keep_up
        self._clock = clock
        self._sleep = sleep
        self._slice_end = clock() + slice_s

    def tick(self, backlog: int) -> bool:
        now = self._clock()
        if now < self._slice_end:
            return False
        paused = backlog < self._keep_up
        if paused:
            self._sleep(self._pause)
            now = self._clock()
        self._slice_end = now + self._slice
        return paused


BUSY_WINDOW_S = 5.0  # how long the builder's share of a CPU is averaged over
BUSY_SHARE = 0.10  # the share from which a writer on auto hands over to a writer process


class BusyWatch:
    """Whether the builder thread has been busy: `check()`, called on that thread after
    each unit of work, is True once the thread's CPU time over the last `window_s` of wall
    time reached `share` of it. An idle builder does not call it, so its idle time counts
    in the next window. A new thread starts a new window."""

    def __init__(
        self,
        window_s: float = BUSY_WINDOW_S,
        share: float = BUSY_SHARE,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
        thread: Callable[[], int] = threading.get_ident,
    ) -> None:
        self.window_s = window_s
        self._share = share
        self._clock = clock
        self._cpu = cpu
        self._thread = thread
        self._start: tuple[int, float, float] | None = None  # (thread, wall, cpu)
        self.last_share = 0.0  # the share of the last whole window

    def check(self) -> bool:
        now = self._clock()
        start = self._start
        if start is not None and now - start[1] < self.window_s and start[0] == self._thread():
            return False
        cpu = self._cpu()
        ident = self._thread()
        self._start = (ident, now, cpu)
        if start is None or start[0] != ident:
            return False
        self.last_share = (cpu - start[2]) / (now - start[1])
        return self.last_share >= self._share
