"""The builder's pauses (pacing.py): after each slice of work, unless the backlog is long."""

from __future__ import annotations

from langchain_bq_audit.pacing import Pacer


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
