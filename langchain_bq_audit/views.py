"""The SQL of the views over the audit table, for `bq-audit init`, the writer and Pulumi.

Every view but the dedup view reads through it, so retries and replays never count twice.
A view is named after its table (`inference_logs_sessions`, ...), so several audit tables
can share one dataset.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import otel_names as semconv

DEDUP = "_dedup"
MODEL_RUNS = "run_type IN ('llm', 'chat_model')"


def dedup(table: str, where: str | None = None) -> str:
    """One row per event id: the first copy written. `where` (SQL over the table's columns
    that every copy of a row satisfies alike, such as `trace_id = @id`) filters before the
    window, so BigQuery numbers only those rows. A row without an event id (written before
    `init` migrated an older table) is its own row: NULLs share one partition."""
    return (
        "SELECT * EXCEPT(_copy) FROM (\n"
        "  SELECT *, ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY timestamp) AS _copy\n"
        f"  FROM `{table}`{f' WHERE {where}' if where else ''}\n"
        ") WHERE _copy = 1 OR event_id IS NULL"
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


# -- OpenTelemetry -----------------------------------------------------------------------------

_OPERATIONS = semconv.GenAiOperationNameValues
_PROVIDERS = semconv.GenAiProviderNameValues
#: run_type -> `gen_ai.operation.name` (chain runs have none)
OPERATION_NAMES = {
    "chat_model": _OPERATIONS.CHAT,
    "llm": _OPERATIONS.TEXT_COMPLETION,
    "tool": _OPERATIONS.EXECUTE_TOOL,
    "retriever": _OPERATIONS.RETRIEVAL,
}
#: run_type -> `gen_ai.operation.name` (chain runs have none)
OPERATION_NAMES = {
    "chat_model": _OPERATIONS.CHAT,
    "llm": _OPERATIONS.TEXT_COMPLETION,
    "tool": _OPERATIONS.EXECUTE_TOOL,
    "retriever": _OPERATIONS.RETRIEVAL,
}
#: LangChain's `ls_provider` (the `provider` column) -> `gen_ai.provider.name`, for the
#: providers the conventions name; any other provider is passed on as it is.
PROVIDER_NAMES = {
    "openai": _PROVIDERS.OPENAI,
    "anthropic": _PROVIDERS.ANTHROPIC,
    "azure": _PROVIDERS.AZURE_AI_OPENAI,
    "amazon_bedrock": _PROVIDERS.AWS_BEDROCK,
    "bedrock": _PROVIDERS.AWS_BEDROCK,
    "cohere": _PROVIDERS.COHERE,
    "deepseek": _PROVIDERS.DEEPSEEK,
    "google_genai": _PROVIDERS.GCP_GEMINI,
    "google_vertexai": _PROVIDERS.GCP_VERTEX_AI,
    "groq": _PROVIDERS.GROQ,
    "ibm": _PROVIDERS.IBM_WATSONX_AI,
    "mistralai": _PROVIDERS.MISTRAL_AI,
    "mistral": _PROVIDERS.MISTRAL_AI,
    "perplexity": _PROVIDERS.PERPLEXITY,
    "xai": _PROVIDERS.X_AI,
}


def _case(column: str, mapping: Mapping[str, str], default: str = "NULL") -> str:
    whens = " ".join(f"WHEN '{key}' THEN '{value}'" for key, value in mapping.items())
    return f"CASE {column} {whens} ELSE {default} END"


def _params(path: str, kind: str) -> str:
    return f"SAFE_CAST(JSON_VALUE(invocation_params, '$.{path}') AS {kind})"


def _first(kind: str, *keys: str) -> str:
    """The first of `keys` present: `ls_*` ones in `metadata`, the others in the model's
    `invocation_params` (Gemini says `max_output_tokens`, OpenAI's o-series
    `max_completion_tokens`)."""
    found = [
        f"SAFE_CAST(JSON_VALUE(metadata, '$.{key}') AS {kind})"
        if key.startswith("ls_")
        else _params(key, kind)
        for key in keys
    ]
    return f"COALESCE({', '.join(found)})"


def _nested(fields: Mapping[str, str]) -> list[str]:
    """`{"a.b.c": expr}` -> select items `STRUCT(STRUCT(expr AS c) AS b) AS a`, so the dotted
    name is the column's path (`SELECT a.b.c`; BigQuery column names cannot hold dots)."""
    tree: dict[str, object] = {}
    for name, expr in fields.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{name}: {part} is both a value and a prefix")
            node = child
        if leaf in node:
            raise ValueError(f"{name}: named twice, or both a value and a prefix")
        node[leaf] = expr

    def render(name: str, value: object) -> str:
        if isinstance(value, str):
            return f"{value} AS `{name}`"
        assert isinstance(value, dict)
        return f"STRUCT({', '.join(render(k, v) for k, v in value.items())}) AS `{name}`"

    return [render(name, value) for name, value in tree.items()]


#: OpenTelemetry GenAI attribute -> its SQL over the dedup view (`otel_names` holds the names)
OTEL_ATTRIBUTES = {
    semconv.GEN_AI_OPERATION_NAME: _case("run_type", OPERATION_NAMES),
    semconv.GEN_AI_PROVIDER_NAME: _case("provider", PROVIDER_NAMES, default="provider"),
    semconv.GEN_AI_REQUEST_MODEL: (
        f"COALESCE({_params('model', 'STRING')}, {_params('model_name', 'STRING')}, "
        "JSON_VALUE(metadata, '$.ls_model_name'))"
    ),
    # the model's own parameter names, then LangChain's standard `ls_*` metadata
    semconv.GEN_AI_REQUEST_TEMPERATURE: _first("FLOAT64", "temperature", "ls_temperature"),
    semconv.GEN_AI_REQUEST_MAX_TOKENS: _first(
        "INT64", "max_tokens", "max_output_tokens", "max_completion_tokens", "ls_max_tokens"
    ),
    semconv.GEN_AI_RESPONSE_MODEL: "model_name",
    semconv.GEN_AI_USAGE_INPUT_TOKENS: "prompt_tokens",
    semconv.GEN_AI_USAGE_OUTPUT_TOKENS: "completion_tokens",
    semconv.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: "cache_read_tokens",
    semconv.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: "cache_write_tokens",
    semconv.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: "reasoning_tokens",
    semconv.GEN_AI_CONVERSATION_ID: "session_id",
    semconv.GEN_AI_TOOL_NAME: "IF(run_type = 'tool', name, NULL)",
    semconv.ERROR_TYPE: "error_type",
}


def otel(table: str) -> str:
    """Per run, OpenTelemetry's names: W3C `trace_id` and `span_id` of the span active at
    its start (join to Cloud Trace or any OTel backend) and the GenAI semantic conventions'
    attributes as nested columns (`gen_ai.usage.input_tokens`, `error.type`, ...)."""
    columns = [
        "otel_trace_id AS trace_id",
        "otel_span_id AS span_id",
        "timestamp",
        "start_time",
        "latency_ms",
        "event_id",
        "run_id",
        "parent_run_id",
        "run_type",
        "name",
        "status",
        *_nested(OTEL_ATTRIBUTES),
    ]
    return "SELECT\n  " + ",\n  ".join(columns) + f"\nFROM `{table}{DEDUP}`"


# -- LangGraph ----------------------------------------------------------------------------------

#: `parent:<task id>|child:<task id>` -> `parent|child`: the checkpoint namespace without
#: task ids names the subgraph path (LangGraph forbids ':' and '|' in node names).
NODE_PATH = r"REGEXP_REPLACE(langgraph_checkpoint_ns, r':[^|]*', '')"
#: the node's own run (its runs inside carry the node's metadata too)
NODE_RUN = "run_type = 'chain' AND name = langgraph_node"
NODE_LATENCY = f"IF({NODE_RUN}, latency_ms, NULL)"  # quantiles skip NULLs


def nodes(table: str) -> str:
    """Per LangGraph node and subgraph path: executions, failed executions, model calls,
    tokens, cost and p50/p95 latency of the node's runs; failed runs inside it."""
    return (
        "SELECT\n"
        f"  {NODE_PATH} AS node_path,\n"
        "  langgraph_node,\n"
        f"  COUNTIF({NODE_RUN}) AS executions,\n"
        f"  COUNTIF({NODE_RUN} AND status = 'error') AS errors,\n"
        "  COUNTIF(status = 'error') AS failed_runs,\n"
        f"  COUNTIF({MODEL_RUNS}) AS calls,\n"
        "  SUM(prompt_tokens) AS prompt_tokens,\n"
        "  SUM(completion_tokens) AS completion_tokens,\n"
        "  SUM(total_tokens) AS total_tokens,\n"
        "  SUM(cost_usd) AS cost_usd,\n"
        f"  APPROX_QUANTILES({NODE_LATENCY}, 100)[OFFSET(50)] AS p50_latency_ms,\n"
        f"  APPROX_QUANTILES({NODE_LATENCY}, 100)[OFFSET(95)] AS p95_latency_ms\n"
        f"FROM `{table}{DEDUP}`\n"
        "WHERE langgraph_node IS NOT NULL\n"
        "GROUP BY node_path, langgraph_node"
    )


#: view name suffix -> (SQL builder taking the table's full id, description)
VIEWS = {
    DEDUP: (dedup, "One row per event_id (retries and replays removed)."),
    "_sessions": (sessions, "Per session: first and last time, runs, calls, tokens, cost, errors."),
    "_daily_usage": (daily_usage, "Per day, model and user: calls, tokens, cost, p50/p95 latency."),
    "_errors": (errors, "Every failed run, with its error and where it happened."),
    "_otel": (otel, "Per run: OTel trace_id/span_id and GenAI semantic-convention columns."),
    "_nodes": (nodes, "Per LangGraph node and subgraph path: tokens, cost, latency, errors."),
}


def view_queries(full_table_id: str) -> dict[str, tuple[str, str]]:
    """`{full view id: (query, description)}` for every view of `full_table_id`."""
    return {
        full_table_id + suffix: (build(full_table_id), description)
        for suffix, (build, description) in VIEWS.items()
    }
