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


def ensure_table(client: Any, settings: AuditSettings, timeout: float = 30.0) -> None:
    """Create the dataset (in `settings.location`) and the table if they are missing."""
    from google.cloud import bigquery

    retry = bigquery.DEFAULT_RETRY.with_deadline(timeout)
    dataset = bigquery.Dataset(f"{settings.project or client.project}.{settings.dataset}")
    dataset.location = settings.location
    dataset.description = schema.DATASET_DESCRIPTION
    client.create_dataset(dataset, exists_ok=True, retry=retry, timeout=timeout)
    client.create_table(build_table(client, settings), exists_ok=True, retry=retry, timeout=timeout)
