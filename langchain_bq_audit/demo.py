"""`bq-audit demo`: a small app audited into the local BigQuery, then read back and shown."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator
from typing import Any, TextIO

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig

from .handler import BigQueryAuditHandler

# In call order (the two batched questions share an answer, so thread order cannot matter).
_ANSWERS = [
    ("BigQuery is a serverless data warehouse.", 18, 8),
    ("Partitioning splits a table by day so queries scan less.", 21, 11),
    ("Streaming sends the answer token by token.", 17, 8),
    ("An audit log records who asked what, and when.", 19, 10),
    ("An audit log records who asked what, and when.", 20, 10),
]


class _Outage(Iterator[AIMessage]):
    """A model backend that is down: every call raises."""

    def __next__(self) -> AIMessage:
        raise ConnectionError("model provider unavailable (simulated by the demo)")


def _answers() -> Iterator[AIMessage]:
    for text, prompt, completion in itertools.cycle(_ANSWERS):
        yield AIMessage(
            content=text,
            response_metadata={"model_name": "demo-model-1"},
            usage_metadata={
                "input_tokens": prompt,
                "output_tokens": completion,
                "total_tokens": prompt + completion,
            },
        )


def build_chain(messages: Iterator[AIMessage] | None = None) -> Runnable[Any, str]:
    """prompt | fake chat model | parser: the app the demo audits."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You answer in one sentence."), ("human", "{question}")]
    )
    model = GenericFakeChatModel(messages=messages if messages is not None else _answers())
    return prompt | model | StrOutputParser()


def run_app(handler: BigQueryAuditHandler, tag: str) -> int:
    """Two users, three sessions: invoke, batch, stream and a failing call. Returns calls."""
    chain = build_chain()

    def config(session: str, user: str) -> RunnableConfig:
        return {
            "callbacks": [handler],
            "tags": [tag],
            "metadata": {"session_id": session, "user_id": user},
        }

    chain.invoke({"question": "What is BigQuery?"}, config=config("s-alice-1", "alice"))
    chain.invoke({"question": "Why partition a table?"}, config=config("s-alice-1", "alice"))
    for _ in chain.stream({"question": "What is streaming?"}, config=config("s-alice-2", "alice")):
        pass
    chain.batch(
        [{"question": "What is an audit log?"}, {"question": "Who reads an audit log?"}],
        config=config("s-bob-1", "bob"),
    )
    # The app sees its own error; the audit log records it.
    with contextlib.suppress(ConnectionError):
        build_chain(_Outage()).invoke(
            {"question": "Are you there?"}, config=config("s-bob-1", "bob")
        )
    return 6


QUERY = """
SELECT timestamp, session_id, user_id, run_type, name, input_text, output_text,
       total_tokens, latency_ms, status, error_type, error_message, run_id, parent_run_id, trace_id
FROM `{table}`
WHERE @tag IN UNNEST(tags)
ORDER BY start_time
"""


def read_back(client: Any, table: str, tag: str) -> list[dict[str, Any]]:
    """The demo's rows, read from BigQuery with a query."""
    from google.cloud import bigquery

    job = client.query(
        QUERY.format(table=table),
        job_config=bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("tag", "STRING", tag)]
        ),
        job_retry=None,
        timeout=30,
    )
    return [dict(row) for row in job.result(timeout=60)]


def _clip(value: Any, width: int) -> str:
    text = "" if value is None else str(value).replace("\n", " | ")
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS = (
    ("end time", 12), ("session", 9), ("user", 5), ("run", 24), ("input", 28),
    ("output", 28), ("tokens", 6), ("ms", 5), ("status", 6),
)  # fmt: skip


def _in_trace_order(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Rows grouped by trace, each run under its parent, with its depth."""
    children: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        children.setdefault(row["parent_run_id"], []).append(row)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: Any, depth: int) -> None:
        for row in children.get(parent, []):
            out.append((depth, row))
            walk(row["run_id"], depth + 1)

    walk(None, 0)
    return out


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Rows as a readable fixed-width table, each run indented under its parent."""
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS)]
    lines.append("  ".join("-" * width for _, width in COLUMNS))
    for depth, row in _in_trace_order(rows):
        error = f"ERROR {row['error_message']}" if row["error_message"] else ""
        cells = (
            row["timestamp"].strftime("%H:%M:%S.%f")[:12],
            row["session_id"],
            row["user_id"],
            "  " * depth + f"{row['run_type']} {row['name']}",
            row["input_text"],
            row["output_text"] or error,
            "" if row["total_tokens"] is None else row["total_tokens"],
            f"{row['latency_ms']:.1f}",
            row["status"],
        )
        lines.append(
            "  ".join(_clip(c, w).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))
        )
    return "\n".join(lines)


def run_demo(client: Any, out: TextIO, **handler_options: Any) -> int:
    """Run the audited app against `client`, read the rows back and print them. Exit code."""
    tag = f"demo-{uuid.uuid4().hex[:8]}"
    handler = BigQueryAuditHandler(client=client, **handler_options)
    calls = run_app(handler, tag)
    if not handler.flush(timeout=60):
        out.write(f"error: not every row was written: {handler.stats()}\n")
        return 1
    table = f"{client.project}.{handler.settings.dataset}.{handler.settings.table}"
    rows = read_back(client, table, tag)
    out.write(f"{calls} calls by 2 users in 3 sessions -> {len(rows)} rows in {table}\n")
    out.write("(read back from BigQuery with a query; one row per run, nested runs indented)\n\n")
    out.write(format_rows(rows) + "\n")
    models = [r for r in rows if r["run_type"] == "chat_model"]
    tokens = sum(r["total_tokens"] or 0 for r in models)
    errors = sum(1 for r in rows if r["status"] == "error")
    out.write(f"\nmodel calls: {len(models)}, tokens: {tokens}, rows with errors: {errors}\n")
    for kind, message in sorted(
        {(r["error_type"], r["error_message"]) for r in rows if r["status"] == "error"}
    ):
        out.write(f"  error recorded: {kind}: {message}\n")
    handler.close(timeout=10)
    return 0 if rows else 1
