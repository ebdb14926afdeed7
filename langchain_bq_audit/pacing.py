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
"""

from __future__ import annotations

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
