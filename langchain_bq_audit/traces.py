"""One trace as a run tree, and sessions, as a person reads them: the order and depth of a
trace's runs (for `bq-audit trace` and the notebook's timeline) and the text lines of
`bq-audit trace` and `bq-audit sessions`. Pure code over rows as dicts (see
`reading.trace_rows` and `reading.recent_sessions`); no BigQuery here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

Row = Mapping[str, Any]

MODEL_RUN_TYPES = frozenset({"llm", "chat_model"})
INDENT = "  "  # per level of the tree


def cut(text: Any, width: int) -> str:
    """`text` on one line (runs of whitespace made one space), cut to `width` characters
    with a trailing `…` when longer; None is the empty string."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _start(row: Row) -> tuple[Any, ...]:
    # start_time is NULL on rows of old writers: their end orders them instead
    when = row.get("start_time") or row.get("timestamp")
    return (when is None, when or dt.datetime.min, row.get("timestamp") or dt.datetime.min,
            str(row.get("event_id") or ""))  # fmt: skip


def tree(rows: Iterable[Row]) -> list[tuple[int, Row]]:
    """The runs in tree order, each with its depth (0 for a root): a run follows its parent
    (`parent_run_id` = the parent's `run_id`), siblings by start time. A run whose parent is
    not among `rows` (left out by `run_types`, `user_visible`, sampling) is a root; every
    row appears exactly once, even when a run id was used twice."""
    rows = sorted(rows, key=_start)
    ids = {r.get("run_id") for r in rows}
    children: dict[Any, list[Row]] = {}
    for row in rows:
        parent = row.get("parent_run_id")
        if parent is not None and parent in ids and parent != row.get("run_id"):
            children.setdefault(parent, []).append(row)
    order: list[tuple[int, Row]] = []
    seen: set[int] = set()

    def visit(row: Row, depth: int) -> None:
        if id(row) in seen:  # a run id used twice must not loop or repeat
            return
        seen.add(id(row))
        order.append((depth, row))
        for child in children.pop(row.get("run_id"), ()):
            visit(child, depth + 1)

    has_parent = {id(c) for cs in children.values() for c in cs}
    for root in rows:
        if id(root) not in has_parent:
            visit(root, 0)
    for row in rows:  # only in a cycle of parent ids (no root reaches it): still shown
        visit(row, 0)
    return order


def money(cost: float | None, unpriced: int | None = 0) -> str:
    """A cost in USD as `$1,234.000123` (six decimals: a call costs fractions of a cent), `-`
    when not known; with `unpriced` model calls (without a price, so not in `cost`) after it:
    `$0.003500 (+1 unpriced)`, or `- (2 unpriced)` when none had a price. The one form of a
    cost that `bq-audit trace`, `sessions` and `stats` print."""
    if cost is None:
        return f"- ({unpriced} unpriced)" if unpriced else "-"
    return f"${cost:,.6f}" + (f" (+{unpriced} unpriced)" if unpriced else "")


def _ms(latency: float | None) -> str:
    if latency is None:
        return "-"
    return f"{latency:.1f} ms" if latency < 10 else f"{latency:,.0f} ms"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _status(row: Row) -> str:
    status = str(row.get("status") or "-")
    return f"{status}:{row['error_type']}" if row.get("error_type") else status


def totals(rows: Iterable[Row]) -> dict[str, Any]:
    """Runs, model calls, errors, tokens and cost of some runs: tokens and cost summed over
    the runs that have them (`None` when none has), and `unpriced_calls` (model calls without
    a cost), as the views count them."""
    rows = list(rows)
    tokens = [r["total_tokens"] for r in rows if r.get("total_tokens") is not None]
    costs = [r["cost_usd"] for r in rows if r.get("cost_usd") is not None]
    return {
        "runs": len(rows),
        "calls": sum(r.get("run_type") in MODEL_RUN_TYPES for r in rows),
        "errors": sum(r.get("status") == "error" for r in rows),
        "total_tokens": sum(tokens) if tokens else None,
        "cost_usd": sum(costs) if costs else None,
        "unpriced_calls": sum(
            r.get("run_type") in MODEL_RUN_TYPES and r.get("cost_usd") is None for r in rows
        ),
    }


NAME_WIDTH, TEXT_WIDTH = 34, 28
TRACE_HEADER = (
    f"{'run':{NAME_WIDTH}}  {'type':10}  {'status':16}  {'latency':>9}  {'tokens':>7}  "
    f"{'cost':>10}  input -> output"
)


def trace_lines(rows: Iterable[Row]) -> list[str]:
    """What `bq-audit trace` prints for the runs of one or more traces: per trace a summary
    line, then the column names and one line per run, indented by depth under its parent:
    name, run type, status (`error:ValueError`), latency, tokens, cost (`-` when NULL), and
    the first characters of its input and output."""
    traces: dict[Any, list[Row]] = {}
    for row in sorted(rows, key=_start):  # traces in the order they started
        traces.setdefault(row.get("trace_id"), []).append(row)
    lines: list[str] = []
    for trace_id, runs in traces.items():
        lines += _trace_summary(trace_id, runs)
        for depth, row in tree(runs):
            indent = INDENT * min(depth, 8)  # deeper runs still show part of their name
            name = indent + cut(row.get("name") or "-", NAME_WIDTH - len(indent))
            lines.append(
                f"{name:{NAME_WIDTH}}  {row.get('run_type') or '-':10}  "
                f"{cut(_status(row), 16):16}  {_ms(row.get('latency_ms')):>9}  "
                f"{_num(row.get('total_tokens')):>7}  {money(row.get('cost_usd')):>10}  "
                f"{cut(row.get('input_text'), TEXT_WIDTH)!r} -> "
                f"{cut(row.get('output_text'), TEXT_WIDTH)!r}"
            )
    return lines


def _trace_summary(trace_id: Any, runs: list[Row]) -> list[str]:
    total = totals(runs)
    first = runs[0]  # the earliest start: the root, unless it was left out
    who = ", ".join(f"{k} {first[f'{k}_id']}" for k in ("session", "user") if first.get(f"{k}_id"))
    where = [who] if who else []
    start = first.get("start_time") or first.get("timestamp")
    where += [f"started {start:%Y-%m-%d %H:%M:%S} UTC"] if start else []
    return [
        f"trace {trace_id}: {total['runs']} runs, {total['calls']} model call(s), "
        f"{total['errors']} error(s), {_num(total['total_tokens'])} tokens, cost "
        f"{money(total['cost_usd'], total['unpriced_calls'])}" + "".join(f"; {x}" for x in where),
        TRACE_HEADER,
    ]


def _time(value: dt.datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def session_lines(sessions: Iterable[Row]) -> list[str]:
    """What `bq-audit sessions` prints: the column names, then a line per session (as
    `reading.recent_sessions` gives them): its first and last time, runs, model calls,
    tokens, cost (`money`: `-` when no run has a price, with its unpriced calls), errors,
    and its users (count: ids)."""
    sessions = list(sessions)
    costs = [money(s.get("cost_usd"), s.get("unpriced_calls")) for s in sessions]
    width = max([10, *map(len, costs)])  # the column is as wide as its widest cost
    lines = [
        f"{'session':20}  {'first run (UTC)':19}  {'last run (UTC)':19}  {'runs':>5}  "
        f"{'calls':>5}  {'tokens':>8}  {'cost':>{width}}  {'errors':>6}  users"
    ]
    for s, cost in zip(sessions, costs, strict=True):
        users = f"{s.get('users') or 0}: {', '.join(s.get('user_ids') or ())}".rstrip(": ")
        lines.append(
            f"{cut(s.get('session_id'), 20):20}  {_time(s.get('first_time')):19}  "
            f"{_time(s.get('last_time')):19}  {s.get('runs') or 0:>5}  "
            f"{s.get('calls') or 0:>5}  {_num(s.get('total_tokens')):>8}  "
            f"{cost:>{width}}  {s.get('errors') or 0:>6}  {cut(users, 40)}"
        )
    return lines
