"""Idempotent creation of the audit dataset and table from `schema.py`."""

from __future__ import annotations

from typing import Any

from . import schema
from .settings import AuditSettings


def table_id(client: Any, settings: AuditSettings) -> str:
    """`project.dataset.table` of the audit table for this client."""
    return f"{settings.project or client.project}.{settings.dataset}.{settings.table}"


def build_table(client: Any, settings: AuditSettings) -> Any:
    """The `bigquery.Table` definition: schema, DAY partitioning, clustering, description."""
    from google.cloud import bigquery

    table = bigquery.Table(table_id(client, settings), schema=schema.to_schema_fields())
    table.time_partitioning = bigquery.TimePartitioning(
        type_=schema.PARTITION_TYPE, field=schema.PARTITION_FIELD
    )
    table.clustering_fields = list(schema.CLUSTERING_FIELDS)
    table.description = schema.TABLE_DESCRIPTION
    return table


DEDUP_SUFFIX = "_dedup"


def dedup_view_sql(full_table_id: str) -> str:
    """One row per event id: replays and retries can write a row twice, reads stay exact."""
    return (
        "SELECT * EXCEPT(_copy) FROM (\n"
        "  SELECT *, ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY timestamp) AS _copy\n"
        f"  FROM `{full_table_id}`\n"
        ") WHERE _copy = 1"
    )


def ensure_table(
    client: Any, settings: AuditSettings, timeout: float = 30.0, retry: bool = True
) -> None:
    """Create the dataset (in `settings.location`), the table and its dedup view if missing.

    Each request times out after `timeout`; with `retry`, transient errors are retried for
    up to `timeout` too (the writer passes False: its own retry loop bounds the time).
    """
    from google.cloud import bigquery

    retry_policy = bigquery.DEFAULT_RETRY.with_deadline(timeout) if retry else None
    dataset = bigquery.Dataset(f"{settings.project or client.project}.{settings.dataset}")
    dataset.location = settings.location
    dataset.description = schema.DATASET_DESCRIPTION
    client.create_dataset(dataset, exists_ok=True, retry=retry_policy, timeout=timeout)
    full_id = table_id(client, settings)
    client.create_table(build_table(client, settings), exists_ok=True, retry=retry_policy,
                        timeout=timeout)  # fmt: skip
    view = bigquery.Table(full_id + DEDUP_SUFFIX)
    view.view_query = dedup_view_sql(full_id)
    view.description = f"{settings.table} with one row per event_id (retries and replays removed)."
    client.create_table(view, exists_ok=True, retry=retry_policy, timeout=timeout)
