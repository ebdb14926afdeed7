"""The run tree and the text of `bq-audit trace` / `sessions`, on rows as dicts (no BigQuery)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from langchain_bq_audit.traces import money, session_lines, trace_lines, tree

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)


def run(run_id: str, parent: str | None, start_ms: int, **extra: Any) -> dict[str, Any]:
    row = {
        "trace_id": "t", "run_id": run_id, "parent_run_id": parent, "event_id": f"e-{run_id}",
        "name": run_id, "run_type": "chain", "status": "ok", "error_type": None,
        "start_time": T0 + dt.timedelta(milliseconds=start_ms),
        "timestamp": T0 + dt.timedelta(milliseconds=start_ms + 5), "latency_ms": 5.0,
        "total_tokens": None, "cost_usd": None, "session_id": "s", "user_id": "u",
        "input_text": "in", "output_text": "out",
    }  # fmt: skip
    return {**row, **extra}


def names(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(depth, row["name"]) for depth, row in tree(rows)]


def test_tree_puts_each_run_under_its_parent_siblings_by_start() -> None:
    rows = [run("b2", "a", 3), run("c", "b1", 2), run("a", None, 0), run("b1", "a", 1)]
    assert names(rows) == [(0, "a"), (1, "b1"), (2, "c"), (1, "b2")]


def test_tree_keeps_every_row_once_when_parents_are_missing_repeated_or_cyclic() -> None:
    # the root was left out (run_types, user_visible): its children become roots
    assert names([run("m", "gone", 1), run("p", "gone", 0)]) == [(0, "p"), (0, "m")]
    # a run id used twice: both rows shown, the child once
    twice = [run("a", None, 0), {**run("a", None, 5), "name": "a again"}, run("c", "a", 1)]
    assert names(twice) == [(0, "a"), (1, "c"), (0, "a again")]
    # parent ids that form a cycle (no row reaches them from a root) are still shown
    assert names([run("x", "y", 0), run("y", "x", 1)]) == [(0, "x"), (1, "y")]
    # start_time NULL (rows of an older writer): ordered by their end
    assert names([run("late", None, 9), {**run("old", None, 0), "start_time": None}]) == [
        (0, "old"), (0, "late"),
    ]  # fmt: skip


def test_costs_print_in_dollars_and_a_missing_cost_as_a_dash() -> None:
    assert money(None) == "-"
    assert money(0.000153) == "$0.000153"
    assert money(3_500_000.804465) == "$3,500,000.804465"  # as stats, sessions, trace print it
    # a sum some model calls are missing from says how many; none priced: unknown, not $0
    assert money(0.0035, 1) == "$0.003500 (+1 unpriced)"
    assert money(None, 14) == "- (14 unpriced)"
    assert money(0.0, 0) == "$0.000000"
    lines = trace_lines([
        run("root", None, 0),
        run("model", "root", 1, run_type="chat_model", total_tokens=30, cost_usd=0.0001),
        run("model2", "root", 2, run_type="chat_model", total_tokens=12, cost_usd=0.00005),
        run("tool", "root", 3, run_type="tool", status="error", error_type="ValueError"),
    ])  # fmt: skip
    assert lines[0] == (
        "trace t: 4 runs, 2 model call(s), 1 error(s), 42 tokens, cost $0.000150; "
        "session s, user u; started 2026-11-30 12:00:00 UTC"
    )
    assert lines[3].split() == ["model", "chat_model", "ok", "5.0", "ms", "30", "$0.000100",
                                "'in'", "->", "'out'"]  # fmt: skip
    assert lines[2].startswith("root  ") and lines[3].startswith("  model  ")  # by depth
    assert lines[5].split()[:3] == ["tool", "tool", "error:ValueError"]
    deep = [run(f"r{i}", f"r{i - 1}" if i else None, i) for i in range(12)]
    assert [line[:20] for line in trace_lines(deep)[10:]] == [
        " " * 16 + "r8  ", " " * 16 + "r9  ", " " * 16 + "r10 ", " " * 16 + "r11 ",
    ]  # fmt: skip
    partial = trace_lines([
        run("root", None, 0),
        run("gpt", "root", 1, run_type="chat_model", total_tokens=30, cost_usd=0.0035),
        run("private", "root", 2, run_type="llm", total_tokens=12, cost_usd=None),
    ])[0]  # fmt: skip
    assert partial.startswith("trace t: 3 runs, 2 model call(s), 0 error(s), 42 tokens, cost "
                              "$0.003500 (+1 unpriced); ")  # fmt: skip
    alone = trace_lines([run("root", None, 0)])[0]
    assert alone.startswith("trace t: 1 runs, 0 model call(s), 0 error(s), - tokens, cost -;")


def test_session_lines_show_a_cost_when_a_run_had_one() -> None:
    session = {"session_id": "s-1", "first_time": T0, "last_time": T0, "runs": 3, "calls": 1,
               "total_tokens": 1234, "errors": 0, "users": 2, "user_ids": ["ana", "bob"],
               "cost_usd": 0.0021}  # fmt: skip
    header, line = session_lines([session])
    assert header.split()[0] == "session"
    assert line.split() == ["s-1", "2026-11-30", "12:00:00", "2026-11-30", "12:00:00", "3",
                            "1", "1,234", "$0.002100", "0", "2:", "ana,", "bob"]  # fmt: skip

    partial = {**session, "session_id": "s-2", "cost_usd": 3_500_000.804465, "unpriced_calls": 1}
    header, line, wide = session_lines([session, partial])
    assert line.split()[8] == "$0.002100"
    assert wide.split()[8:11] == ["$3,500,000.804465", "(+1", "unpriced)"]
    # one column: every cost ends under the end of `cost`
    ends = {header.index("cost") + 4, line.index("$0.002100") + 9, wide.index("unpriced)") + 9}
    assert len(ends) == 1
