"""The audit table, spelled once: columns, modes, descriptions, partitioning, clustering.

Everything else (row building, provisioning, the Pulumi component, docs) renders from here.
This module imports nothing of ours and nothing of Google's at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_DATASET = "language_model_logging"
DEFAULT_TABLE = "inference_logs"
DEFAULT_LOCATION = "US"


@dataclass(frozen=True)
class Column:
    """One column of the audit table."""

    name: str
    type: str  # BigQuery standard type name: STRING, INT64, TIMESTAMP, JSON, BOOL, FLOAT64
    mode: str  # NULLABLE, REQUIRED or REPEATED
    description: str
    group: str


def _c(name: str, type_: str, mode: str, group: str, description: str) -> Column:
    return Column(name, type_, mode, description, group)


_N, _R, _REP = "NULLABLE", "REQUIRED", "REPEATED"

# Order matters only for readability; the seed's five columns come first and keep their
# names and modes so a table made by the original Pulumi program migrates by adding columns.
COLUMNS: tuple[Column, ...] = (
    _c("timestamp", "TIMESTAMP", _R, "seed", "When the run ended (UTC). Partition column."),
    _c("input_text", "STRING", _R, "seed", "The run's input as readable text."),
    _c("output_text", "STRING", _R, "seed", "The run's output as readable text; empty on error."),
    _c("user_id", "STRING", _N, "seed", "End user the run was made for."),
    _c("session_id", "STRING", _N, "seed", "Conversation or session the run belongs to."),
    _c("event_id", "STRING", _R, "identity", "Unique id of this row; the insertId used for dedup."),
    _c("run_id", "STRING", _N, "identity", "LangChain run id."),
    _c("parent_run_id", "STRING", _N, "identity", "Run id of the parent run, if any."),
    _c("trace_id", "STRING", _N, "identity", "Run id of the root run of this trace."),
    _c("run_type", "STRING", _N, "identity", "llm, chat_model, chain, tool or retriever."),
    _c("name", "STRING", _N, "identity", "Name of the runnable, model class, tool or retriever."),
    _c("status", "STRING", _N, "outcome", "ok, error, interrupted, cancelled or abandoned."),
    _c("error_type", "STRING", _N, "outcome", "Exception class (or ToolMessage) when not ok."),
    _c("error_message", "STRING", _N, "outcome", "Error message; the interrupt's value as JSON."),
    _c("start_time", "TIMESTAMP", _N, "outcome", "When the run started (UTC)."),
    _c("latency_ms", "FLOAT64", _N, "outcome", "Wall time from start to end, in milliseconds."),
    _c("time_to_first_token_ms", "FLOAT64", _N, "outcome", "Start to first streamed token, ms."),
    _c("model_name", "STRING", _N, "model", "Model name as reported by the provider or params."),
    _c("provider", "STRING", _N, "model", "Model provider, e.g. openai, anthropic, google."),
    _c("invocation_params", "JSON", _N, "model", "Model parameters, secrets removed."),
    _c("input_messages", "JSON", _N, "content", "Chat input messages, whole, as JSON."),
    _c("output_messages", "JSON", _N, "content", "Output messages (generations), as JSON."),
    _c("tool_calls", "JSON", _N, "content", "Tool calls requested by the model: name, args, id."),
    _c("is_truncated", "BOOL", _N, "content", "True when a field was cut to its size cap."),
    _c("prompt_tokens", "INT64", _N, "usage", "Input tokens, cached ones too; NULL if unknown."),
    _c("completion_tokens", "INT64", _N, "usage", "Output tokens; NULL when unknown."),
    _c("total_tokens", "INT64", _N, "usage", "Total tokens; NULL when unknown."),
    _c("cache_read_tokens", "INT64", _N, "usage", "Input tokens served from a prompt cache."),
    _c("reasoning_tokens", "INT64", _N, "usage", "Output tokens spent on hidden reasoning."),
    _c("cache_write_tokens", "INT64", _N, "usage", "Input tokens written to a prompt cache."),
    _c("token_usage_source", "STRING", _N, "usage", "provider, stream (chunks' sum) or missing."),
    _c("cost_usd", "FLOAT64", _N, "cost", "Price of the model call in USD; NULL when unknown."),
    _c("cost_details", "JSON", _N, "cost", "USD parts (input, cache_read, ...), model, provider."),
    _c("price_source", "STRING", _N, "cost", "genai-prices VERSION, or override (your prices)."),
    _c("tags", "STRING", _REP, "context", "LangChain tags of the run."),
    _c("metadata", "JSON", _N, "context", "LangChain metadata of the run, secrets removed."),
    _c("langgraph_node", "STRING", _N, "agent", "LangGraph node (agent) the run ran in."),
    _c("langgraph_step", "INT64", _N, "agent", "LangGraph step (superstep) of that node."),
    _c("langgraph_checkpoint_ns", "STRING", _N, "agent", "Subgraph path: the checkpoint ns."),
    _c("otel_trace_id", "STRING", _N, "otel", "W3C trace id of the active OTel span, 32 hex."),
    _c("otel_span_id", "STRING", _N, "otel", "W3C span id of the active OTel span, 16 hex."),
    _c("app_name", "STRING", _N, "context", "Application name from settings."),
    _c("environment", "STRING", _N, "context", "Deployment environment from settings."),
    _c("capture_mode", "STRING", _N, "privacy", "full, redacted or metadata (no text kept)."),
    _c("input_sha256", "STRING", _N, "privacy", "SHA-256 of the input text (metadata mode)."),
    _c("output_sha256", "STRING", _N, "privacy", "SHA-256 of the output text (metadata mode)."),
    _c("input_chars", "INT64", _N, "privacy", "Length of the input text (metadata mode)."),
    _c("output_chars", "INT64", _N, "privacy", "Length of the output text (metadata mode)."),
    _c("chain_id", "STRING", _N, "integrity", "Hash chain of the writer that wrote the row."),
    _c("seq", "INT64", _N, "integrity", "Position of the row in its chain, from 1."),
    _c("prev_hash", "STRING", _N, "integrity", "row_hash of the previous row of the chain."),
    _c("row_hash", "STRING", _N, "integrity", "SHA-256 of the row's canonical JSON."),
    _c(
        "sample_rate",
        "FLOAT64",
        _N,
        "volume",
        "Share of traces kept (1 on failed runs): weight 1/rate.",
    ),
)

# The signed digests of the hash chains (digests.py), in a table of their own next to the
# audit table, named after it (`inference_logs_digests`), so that its IAM can differ.
DIGEST_TABLE_SUFFIX = "_digests"
DIGEST_COLUMNS: tuple[Column, ...] = (
    _c("time", "TIMESTAMP", _R, "digest", "When the digest was signed (UTC). Partition column."),
    _c("event_id", "STRING", _R, "digest", "chain_id:digest_seq; the insertId used for dedup."),
    _c("chain_id", "STRING", _R, "digest", "The hash chain this digest covers."),
    _c("digest_seq", "INT64", _R, "digest", "Position of the digest among its chain's, from 1."),
    _c("first_seq", "INT64", _R, "digest", "First seq of the rows this digest covers."),
    _c("last_seq", "INT64", _R, "digest", "Last seq of the rows this digest covers."),
    _c("row_count", "INT64", _R, "digest", "Rows first covered here (0: a closing re-sign)."),
    _c("last_row_hash", "STRING", _R, "digest", "row_hash of the row at last_seq."),
    _c("closed", "BOOL", _R, "digest", "True when written at close: no later row was written."),
    _c("key_id", "STRING", _R, "digest", "Key that signed: SHA-256 of its public key, 16 hex."),
    _c("prev_signature", "STRING", _N, "digest", "signature of the chain's previous digest."),
    _c("signature", "STRING", _R, "digest", "Ed25519 signature of the fields above, hex."),
)
DIGEST_PARTITION_FIELD = "time"
DIGEST_TABLE_DESCRIPTION = (
    "Signed digests of the audit table's hash chains (bq-audit verify --public-key)."
)

COLUMN_NAMES: frozenset[str] = frozenset(c.name for c in COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.mode == _R)
JSON_COLUMNS: frozenset[str] = frozenset(c.name for c in COLUMNS if c.type == "JSON")

PARTITION_FIELD = "timestamp"
PARTITION_TYPE = "DAY"
CLUSTERING_FIELDS: tuple[str, ...] = ("session_id", "user_id", "model_name", "run_type")
TABLE_DESCRIPTION = (
    "Audit log of LLM, chat model, chain, tool and retriever runs (one row per run)."
)
DATASET_DESCRIPTION = "Dataset to store logs of large language model inferences"
DEFAULT_LABELS: dict[str, str] = {"managed-by": "langchain-bq-audit"}
_MS_PER_DAY = 86_400_000

# BigQuery reports some types by their legacy names; these are the same type.
TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "RECORD": "STRUCT"}


def normalize_type(type_name: str) -> str:
    """A BigQuery type name in its standard SQL spelling (INTEGER -> INT64, ...)."""
    upper = type_name.upper()
    return TYPE_ALIASES.get(upper, upper)


def retention_ms(retention_days: int | None) -> int | None:
    """Partition expiration in milliseconds; None keeps partitions forever."""
    return None if retention_days is None else retention_days * _MS_PER_DAY


def table_definition(
    retention_days: int | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """The whole table as plain data: what `bq-audit init`, the writer and the Pulumi
    component all build, and what the tests compare them against."""
    return {
        "schema": to_api_json(),
        "time_partitioning": {
            "type": PARTITION_TYPE,
            "field": PARTITION_FIELD,
            "expiration_ms": retention_ms(retention_days),
        },
        "clustering": list(CLUSTERING_FIELDS),
        "description": TABLE_DESCRIPTION,
        "labels": {**DEFAULT_LABELS, **(labels or {})},
    }


def digest_table_definition(
    retention_days: int | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """The digests table as plain data, in the shape of `table_definition` (no clustering:
    it holds one row per chain and interval). Digests are kept as long as the rows."""
    return {
        "schema": to_api_json(DIGEST_COLUMNS),
        "time_partitioning": {
            "type": PARTITION_TYPE,
            "field": DIGEST_PARTITION_FIELD,
            "expiration_ms": retention_ms(retention_days),
        },
        "clustering": [],
        "description": DIGEST_TABLE_DESCRIPTION,
        "labels": {**DEFAULT_LABELS, **(labels or {})},
    }


def to_api_json(columns: tuple[Column, ...] = COLUMNS) -> list[dict[str, Any]]:
    """The schema as BigQuery's JSON schema (what `bq mk --schema` and Pulumi take)."""
    return [
        {"name": c.name, "type": c.type, "mode": c.mode, "description": c.description}
        for c in columns
    ]


def to_json(indent: int | None = 2) -> str:
    """The schema as a JSON string."""
    import json

    return json.dumps(to_api_json(), indent=indent)


def to_markdown(columns: tuple[Column, ...] = COLUMNS, header: str = "column") -> str:
    """The schema as a Markdown table for the docs (`header` names the first column)."""
    lines = [f"| {header} | type | mode | description |", "|---|---|---|---|"]
    lines += [f"| `{c.name}` | {c.type} | {c.mode} | {c.description} |" for c in columns]
    return "\n".join(lines)


def to_ddl(full_table_id: str, retention_days: int | None = None) -> str:
    """`CREATE TABLE IF NOT EXISTS` for the table, in BigQuery's SQL."""

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"')

    cols = []
    for c in COLUMNS:
        type_ = f"ARRAY<{c.type}>" if c.mode == _REP else c.type
        not_null = " NOT NULL" if c.mode == _R else ""
        cols.append(f'  `{c.name}` {type_}{not_null} OPTIONS(description="{esc(c.description)}")')
    options = [f'description="{esc(TABLE_DESCRIPTION)}"']
    if retention_days is not None:
        options.append(f"partition_expiration_days={retention_days}")
    labels = ", ".join(f'("{k}", "{v}")' for k, v in DEFAULT_LABELS.items())
    options.append(f"labels=[{labels}]")
    return (
        f"CREATE TABLE IF NOT EXISTS `{full_table_id}` (\n" + ",\n".join(cols) + "\n)\n"
        f"PARTITION BY DATE(`{PARTITION_FIELD}`)\n"
        f"CLUSTER BY {', '.join(CLUSTERING_FIELDS)}\n"
        f"OPTIONS({', '.join(options)});"
    )


def to_schema_fields(columns: tuple[Column, ...] = COLUMNS) -> list[Any]:
    """The schema as `google.cloud.bigquery.SchemaField`s (imports google.cloud lazily)."""
    from google.cloud import bigquery

    return [
        bigquery.SchemaField(c.name, c.type, mode=c.mode, description=c.description)
        for c in columns
    ]
