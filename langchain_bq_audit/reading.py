"""Reading the audit table back: the latest rows, a summary, one trace's runs and the latest
sessions (for `bq-audit tail`/`stats`/`trace`/`sessions` and the notebook helper). Every query is
bounded in time and never retried for minutes."""

from __future__ import annotations

import datetime as dt
from typing import Any

TAIL_COLUMNS = (
    "timestamp", "session_id", "user_id", "run_type", "name", "status", "model_name",
    "total_tokens", "latency_ms", "input_text", "output_text", "error_type", "event_id",
)  # fmt: skip


TRACE_COLUMNS = (
    "trace_id", "run_id", "parent_run_id", "event_id", "name", "run_type", "status",
    "error_type", "start_time", "timestamp", "latency_ms", "total_tokens", "cost_usd",
    "model_name", "session_id", "user_id", "input_text", "output_text",
)  # fmt: skip

SESSION_COLUMNS = (
    "session_id", "first_time", "last_time", "runs", "calls", "total_tokens", "cost_usd",
    "unpriced_calls", "errors", "users", "user_ids",
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


def summary(client: Any, table: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """Rows, sessions, users, model calls, tokens, errors of `table`, and when its newest run
    ended (`newest_run_end`: the table has no write time; a replayed row keeps its end).
    Cost in USD: `cost_usd` (all time; None when no row has a price), `unpriced_calls`
    (model calls without a price, not in it), and over the 24 h before `now` (default: the
    clock) `cost_usd_24h`, `unpriced_calls_24h` and `model_calls_24h`. Read through the
    dedup query: a row written twice counts once."""
    from .views import MODEL_RUNS, dedup

    since = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(hours=24)
    (row,) = run_query(
        client,
        "SELECT COUNT(*) AS rows, COUNT(DISTINCT session_id) AS sessions, "
        f"COUNT(DISTINCT user_id) AS users, COUNTIF({MODEL_RUNS}) AS model_calls, "
        "SUM(total_tokens) AS total_tokens, COUNTIF(status = 'error') AS errors, "
        "MAX(timestamp) AS newest_run_end, SUM(cost_usd) AS cost_usd, "
        f"COUNTIF({MODEL_RUNS} AND cost_usd IS NULL) AS unpriced_calls, "
        f"COUNTIF({MODEL_RUNS} AND timestamp >= @since) AS model_calls_24h, "
        f"COUNTIF({MODEL_RUNS} AND timestamp >= @since AND cost_usd IS NULL) "
        "AS unpriced_calls_24h, "
        "SUM(IF(timestamp >= @since, cost_usd, NULL)) AS cost_usd_24h "
        f"FROM ({dedup(table)})",
        {"since": since},
    )
    row["total_tokens"] = row["total_tokens"] or 0  # a cost stays None: unknown, not $0
    return row


def trace_rows(
    client: Any, table: str, id_: str, columns: tuple[str, ...] | None = TRACE_COLUMNS
) -> list[dict[str, Any]]:
    """Every run of the trace that `id_` names, oldest start first: `id_` is a trace id, or
    the run id or event id of any run of it (a run id used in two calls names both traces).
    `columns=None` selects every column. Empty when nothing matches.

    Read through the dedup query (`views.dedup`), filtered on the trace before it numbers
    copies: a row written twice shows once."""
    from .views import dedup

    cols = "*" if columns is None else ", ".join(f"`{c}`" for c in columns)
    traces = f"SELECT trace_id FROM `{table}` WHERE @id IN (trace_id, run_id, event_id)"
    sql = (
        f"SELECT {cols} FROM ({dedup(table, f'trace_id IN ({traces})')}) "
        "ORDER BY COALESCE(start_time, timestamp), timestamp, event_id"
    )
    return run_query(client, sql, {"id": id_})


def recent_sessions(
    client: Any, table: str, limit: int = 20, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """The `limit` sessions whose last run ended latest (newest first), optionally only those
    active since `since`, from the `<table>_sessions` view (`SESSION_COLUMNS`; `cost_usd` is
    the sum of its runs' `cost_usd`, None when none of them has a price)."""
    where, params = "TRUE", {}
    if since is not None:
        where, params = "last_time >= @since", {"since": since}
    cols = ", ".join(f"`{c}`" for c in SESSION_COLUMNS)
    sql = (
        f"SELECT {cols} FROM `{table}_sessions` WHERE {where} "
        f"ORDER BY last_time DESC, session_id LIMIT {int(limit)}"
    )
    return run_query(client, sql, params)
