"""Reading the audit table back: the latest rows and a summary (for `bq-audit tail`/`stats`
and the notebook helper). Every query is bounded in time and never retried for minutes."""

from __future__ import annotations

import datetime as dt
from typing import Any

TAIL_COLUMNS = (
    "timestamp", "session_id", "user_id", "run_type", "name", "status", "model_name",
    "total_tokens", "latency_ms", "input_text", "output_text", "error_type", "event_id",
)  # fmt: skip


def run_query(client: Any, sql: str, params: dict[str, Any] | None = None,
              timeout: float = 60.0, retry_s: float = 10.0) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of `sql` as dicts; `params` become query parameters (str, int, date, datetime).

    `timeout` bounds each request and the wait for the result; transient failures are
    retried for `retry_s` seconds.
    """
    from google.cloud import bigquery

    types = {str: "STRING", int: "INT64", dt.date: "DATE", dt.datetime: "TIMESTAMP"}
    config = bigquery.QueryJobConfig(
        query_parameters=[
            bigquery.ScalarQueryParameter(k, types[type(v)], v) for k, v in (params or {}).items()
        ]
    )
    # google's default retry goes on for 10 minutes: a person is waiting, give up sooner
    retry = bigquery.DEFAULT_RETRY.with_deadline(retry_s)
    job = client.query(sql, job_config=config, job_retry=None, retry=retry, timeout=timeout)
    return [dict(r) for r in job.result(timeout=timeout, retry=retry)]


def recent_rows(
    client: Any,
    table: str,
    n: int = 20,
    session: str | None = None,
    user: str | None = None,
    after: dt.datetime | None = None,
    columns: tuple[str, ...] | None = TAIL_COLUMNS,
) -> list[dict[str, Any]]:
    """The latest `n` rows of `table` (oldest first), optionally of one session or user,
    or only those that ended after `after`. `columns=None` selects every column.

    Read through the dedup query (`views.dedup`): a row written twice (a retry, a replay)
    shows once."""
    from .views import dedup

    where: list[str] = []
    params: dict[str, Any] = {}
    if session is not None:
        where.append("session_id = @session")
        params["session"] = session
    if user is not None:
        where.append("user_id = @user")
        params["user"] = user
    if after is not None:
        where.append("timestamp > @after")
        params["after"] = after
    cols = "*" if columns is None else ", ".join(f"`{c}`" for c in columns)
    sql = (
        f"SELECT {cols} FROM ({dedup(table)}) WHERE {' AND '.join(where) or 'TRUE'} "
        f"ORDER BY timestamp DESC LIMIT {int(n)}"
    )
    return list(reversed(run_query(client, sql, params)))


def summary(client: Any, table: str) -> dict[str, Any]:
    """Rows, sessions, users, model calls, tokens, errors of `table`, and when its newest run
    ended (`newest_run_end`: the table has no write time; a replayed row keeps its end)."""
    (row,) = run_query(
        client,
        "SELECT COUNT(DISTINCT event_id) AS rows, COUNT(DISTINCT session_id) AS sessions, "
        "COUNT(DISTINCT user_id) AS users, "
        "COUNTIF(run_type IN ('llm', 'chat_model')) AS model_calls, "
        "SUM(total_tokens) AS total_tokens, COUNTIF(status = 'error') AS errors, "
        f"MAX(timestamp) AS newest_run_end FROM `{table}`",
    )
    row["total_tokens"] = row["total_tokens"] or 0
    return row
