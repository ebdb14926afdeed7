"""The closed-stream rule's bookkeeping (handler.py `_start`, `_end`) when another thread
starts a run inside a run that is ending: a thread switch may land between any two lines,
so each test plays the other thread's part at each line in turn (a line trace)."""

from __future__ import annotations

import linecache
import re
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.records import RunRecord

HANDLER_PY = str(Path(BigQueryAuditHandler.__module__.replace(".", "/")).with_suffix(".py"))


def handler(tmp_path: Path) -> tuple[BigQueryAuditHandler, list[RunRecord]]:
    """A handler of a table of this test's own (its `tmp_path`): the handlers of one table
    share a writer for the whole process, and its run tracker (`_runs`, the collision
    count) with it."""
    made = BigQueryAuditHandler(project="local", table="t_" + re.sub(r"\W", "_", tmp_path.name),
                                spool_dir=str(tmp_path), handle_sigterm=False)  # fmt: skip
    submitted: list[RunRecord] = []
    made._submit = submitted.append  # the records it would write, not a writer's
    return made, submitted


def line_of(frame: FrameType) -> str:
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno)


def traced(call: Callable[[], None], where: Callable[[FrameType], bool], nth: int,
           other: Callable[[], None]) -> bool:  # fmt: skip
    """Run `call` with `other` (the other thread's part) played once, at the `nth` line
    event in handler.py where `where(frame)` holds; whether it was played."""
    seen: list[int] = []

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and where(frame):
            seen.append(1)
            if len(seen) == nth + 1:
                other()
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.endswith(HANDLER_PY) else None

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return len(seen) > nth


def in_end(frame: FrameType) -> bool:  # `_end` and the comprehensions in it
    return frame.f_code.co_name in ("_end", "<genexpr>", "<listcomp>")


def parent_with_an_ended_kid(tmp_path: Any) -> tuple[Any, list[Any], uuid.UUID, uuid.UUID]:
    """A handler with a pending parent whose first child has ended, the records it
    submits, the parent's run id and the id for a late child."""
    h, submitted = handler(tmp_path)
    parent, kid = uuid.uuid4(), uuid.uuid4()
    h.on_chain_start({}, {}, run_id=parent, name="parent")
    h.on_chain_start({}, {}, run_id=kid, parent_run_id=parent, name="kid")
    h.on_chain_end({}, run_id=kid)
    return h, submitted, parent, uuid.uuid4()


def test_a_run_starting_while_its_parent_ends_in_another_thread_loses_no_row(tmp_path) -> None:
    """The other thread has found the parent and goes on at some line of the parent's end."""
    for nth in range(200):
        h, submitted, parent, late = parent_with_an_ended_kid(tmp_path)
        found, go = threading.Event(), threading.Event()

        def late_start(h: BigQueryAuditHandler = h, late: uuid.UUID = late,
                       parent: uuid.UUID = parent, found: threading.Event = found,
                       go: threading.Event = go) -> None:  # fmt: skip
            traced(
                lambda: h.on_chain_start({}, {}, run_id=late, parent_run_id=parent, name="late"),
                lambda f: f.f_code.co_name == "_start" and "if parent is not None" in line_of(f),
                0,
                lambda: (found.set(), go.wait(60)),
            )

        starter = threading.Thread(target=late_start)
        starter.start()
        assert found.wait(60)

        def let_it_start(go: threading.Event = go, starter: threading.Thread = starter) -> None:
            go.set()
            starter.join(10)

        played = traced(
            lambda h=h, parent=parent: h.on_chain_end({}, run_id=parent), in_end, nth, let_it_start
        )
        go.set()
        starter.join(10)
        h.on_chain_end({}, run_id=late)
        assert h._counts["callback_errors"] == 0, nth
        assert sorted(r.name for r in submitted) == ["kid", "late", "parent"], nth
        if not played:
            return


def test_a_parent_ending_while_a_run_inside_it_starts_loses_no_row(tmp_path) -> None:
    """The parent ends, in the other thread, at some line of the start of a run inside it."""
    for nth in range(200):
        h, submitted, parent, late = parent_with_an_ended_kid(tmp_path)
        played = traced(
            lambda h=h, late=late, parent=parent: h.on_chain_start(
                {}, {}, run_id=late, parent_run_id=parent, name="late"
            ),
            lambda f: f.f_code.co_name == "_start",
            nth,
            lambda h=h, parent=parent: h.on_chain_end({}, run_id=parent),
        )
        if not played:  # past the start's last line: the parent ends after it
            h.on_chain_end({}, run_id=parent)
        h.on_chain_end({}, run_id=late)
        assert h._counts["callback_errors"] == 0, nth
        assert h._counts["unmatched_ends"] == 0, nth
        assert sorted(r.name for r in submitted) == ["kid", "late", "parent"], nth
        if not played:
            return


def test_two_calls_that_share_a_run_id_are_not_cut_off_by_each_other(tmp_path) -> None:
    """Two concurrent calls given one `run_id` (counted in `run_id_collisions`): the first
    ends, finished, while the run inside the second is still running."""
    from langchain_core.runnables import RunnableConfig, RunnableLambda

    h, submitted = handler(tmp_path)
    second_started, first_ended = threading.Event(), threading.Event()

    def work(role: str) -> str:
        if role == "first":  # ends once the second call's inner run is running
            assert second_started.wait(60)
        else:
            second_started.set()
            assert first_ended.wait(60)
        return role

    inner = RunnableLambda(work, name="inner")

    def call(role: str, config: RunnableConfig) -> str:
        return inner.invoke(role, config)

    outer = RunnableLambda(call, name="outer")
    config: RunnableConfig = {"callbacks": [h], "run_id": uuid.uuid4()}

    def first() -> None:
        outer.invoke("first", dict(config))  # type: ignore[arg-type]
        first_ended.set()

    runs = [threading.Thread(target=first)]
    runs[0].start()
    while not h._runs:  # the first call has started
        threading.Event().wait(0.001)
    runs.append(threading.Thread(target=outer.invoke, args=("second", dict(config))))
    runs[1].start()
    for thread in runs:
        thread.join(10)
    assert h._tracker.run_id_collisions == 1
    assert sorted(r.name for r in submitted) == ["inner", "inner", "outer", "outer"]
    assert [(r.name, type(r.error).__name__) for r in submitted if r.error] == []
