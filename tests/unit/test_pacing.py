"""The builder's pauses (pacing.py): after each slice of work, unless the backlog is long;
and when the builder counts as busy (the hand-over to a writer process)."""

from __future__ import annotations

from langchain_bq_audit.pacing import BusyWatch, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_pause_after_each_slice_of_work() -> None:
    clock = Clock()
    # units of 100 us, so that the clock's sums are exact
    pacer = Pacer(slice_s=5.0, pause_s=0.5, keep_up=10, clock=clock, sleep=clock.sleep)
    paused = []
    for _ in range(20):  # 20 rows of one unit each
        clock.now += 1.0
        paused.append(pacer.tick(backlog=3))
    # a slice is 5 units of work: a pause's own time does not count as work
    assert [i + 1 for i, p in enumerate(paused) if p] == [5, 10, 15, 20]
    assert clock.sleeps == [0.5] * 4


def test_no_pause_while_the_backlog_is_long() -> None:
    clock = Clock()
    pacer = Pacer(slice_s=5.0, pause_s=0.5, keep_up=10, clock=clock, sleep=clock.sleep)
    paused = []
    for backlog in range(40, 0, -1):  # catching up: 40 runs queued, then fewer
        clock.now += 1.0
        if pacer.tick(backlog):
            paused.append(backlog)
    assert paused and max(paused) < 10  # pauses again only once fewer than 10 are queued


class Thread:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.ident = 1


def watch(clock: Clock, thread: Thread) -> BusyWatch:
    return BusyWatch(window_s=5.0, share=0.1, clock=clock, cpu=lambda: thread.cpu,
                     thread=lambda: thread.ident)  # fmt: skip


def test_busy_once_a_window_of_wall_time_held_the_share_of_cpu() -> None:
    clock, thread = Clock(), Thread()
    busy = watch(clock, thread)
    seen = []
    for _ in range(48):  # 12 s in steps of 0.25 s (exact sums), 37.5 ms of CPU each: 15%
        clock.now += 0.25
        thread.cpu += 0.0375
        seen.append(busy.check())
    # the first check starts a window; each window ends at its first check after 5 s
    assert [0.25 * (i + 1) for i, b in enumerate(seen) if b] == [5.25, 10.25]
    assert round(busy.last_share, 3) == 0.15


def test_not_busy_below_the_share_or_across_idle_time() -> None:
    clock, thread = Clock(), Thread()
    busy = watch(clock, thread)
    busy.check()
    clock.now += 6.0
    thread.cpu += 0.59  # 9.8% of the window
    assert not busy.check()
    assert round(busy.last_share, 3) == 0.098
    clock.now += 60.0  # idle: the builder called nothing; then a burst of 1 s of CPU
    thread.cpu += 1.0
    assert not busy.check()  # 1 s in 60: what the application paid, spread thin


def test_a_new_builder_thread_starts_a_new_window() -> None:
    clock, thread = Clock(), Thread()
    busy = watch(clock, thread)
    busy.check()
    clock.now += 6.0
    thread.ident, thread.cpu = 2, 50.0  # another thread's CPU clock: not comparable
    assert not busy.check()
    clock.now += 6.0
    thread.cpu += 3.0
    assert busy.check()
