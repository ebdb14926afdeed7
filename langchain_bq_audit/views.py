"""The SQL of the views over the audit table, for `bq-audit init`, the writer and Pulumi.

Every view but the dedup view reads through it, so retries and replays never count twice.
A view is named after its table (`inference_logs_sessions`, ...), so several audit tables
can share one dataset.
"""

from __future__ import annotations

DEDUP = "_dedup"
MODEL_RUNS = "run_type IN ('llm', 'chat_model')"


def dedup(table: str, where: str | None = None) -> str:
    """One row per event id: the first copy written. `where` (SQL over the table's columns
    that every copy of a row satisfies alike, such as `trace_id = @id`) filters before the
    window, so BigQuery numbers only those rows."""
    return (
        "SELECT * EXCEPT(_copy) FROM (\n"
        "  SELECT *, ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY timestamp) AS _copy\n"
        f"  FROM `{table}`{f' WHERE {where}' if where else ''}\n"
        ") WHERE _copy = 1"
    )


def sessions(table: str) -> str:
    """Per session: first and last time, runs, model calls, tokens, cost in USD (with the
    model calls that have no price: their cost is not in the sum), errors, users."""
    return (
        "SELECT\n"
        "  session_id,\n"
        "  MIN(start_time) AS first_time,\n"
        "  MAX(timestamp) AS last_time,\n"
        "  COUNT(*) AS runs,\n"
        f"  COUNTIF({MODEL_RUNS}) AS calls,\n"
        "  SUM(prompt_tokens) AS prompt_tokens,\n"
        "  SUM(completion_tokens) AS completion_tokens,\n"
        "  SUM(total_tokens) AS total_tokens,\n"
        "  SUM(cost_usd) AS cost_usd,\n"
        f"  COUNTIF({MODEL_RUNS} AND cost_usd IS NULL) AS unpriced_calls,\n"
        "  COUNTIF(status = 'error') AS errors,\n"
        "  COUNT(DISTINCT user_id) AS users,\n"
        "  ARRAY_AGG(DISTINCT user_id IGNORE NULLS) AS user_ids\n"
        f"FROM `{table}{DEDUP}`\n"
        "WHERE session_id IS NOT NULL\n"
        "GROUP BY session_id"
    )


def daily_usage(table: str) -> str:
    """Per day, model and user: model calls, tokens, cost in USD (and the calls without a
    price, left out of it), errors, p50 and p95 latency."""
    return (
        "SELECT\n"
        "  DATE(timestamp) AS day,\n"
        "  model_name,\n"
        "  user_id,\n"
        "  COUNT(*) AS calls,\n"
        "  SUM(prompt_tokens) AS prompt_tokens,\n"
        "  SUM(completion_tokens) AS completion_tokens,\n"
        "  SUM(total_tokens) AS total_tokens,\n"
        "  SUM(cost_usd) AS cost_usd,\n"
        "  COUNTIF(cost_usd IS NULL) AS unpriced_calls,\n"
        "  COUNTIF(status = 'error') AS errors,\n"
        "  APPROX_QUANTILES(latency_ms, 100)[OFFSET(50)] AS p50_latency_ms,\n"
        "  APPROX_QUANTILES(latency_ms, 100)[OFFSET(95)] AS p95_latency_ms\n"
        f"FROM `{table}{DEDUP}`\n"
        f"WHERE {MODEL_RUNS}\n"
        "GROUP BY day, model_name, user_id"
    )


def errors(table: str) -> str:
    """Every failed run, with its error and where it happened."""
    return (
        "SELECT timestamp, session_id, user_id, run_type, name, model_name, error_type,\n"
        "  error_message, input_text, trace_id, run_id\n"
        f"FROM `{table}{DEDUP}`\n"
        "WHERE status = 'error'"
    )


#: view name suffix -> (SQL builder taking the table's full id, description)
VIEWS = {
    DEDUP: (dedup, "One row per event_id (retries and replays removed)."),
    "_sessions": (sessions, "Per session: first and last time, runs, calls, tokens, cost, errors."),
    "_daily_usage": (daily_usage, "Per day, model and user: calls, tokens, cost, p50/p95 latency."),
    "_errors": (errors, "Every failed run, with its error and where it happened."),
}


def view_queries(full_table_id: str) -> dict[str, tuple[str, str]]:
    """`{full view id: (query, description)}` for every view of `full_table_id`."""
    return {
        full_table_id + suffix: (build(full_table_id), description)
        for suffix, (build, description) in VIEWS.items()
    }
