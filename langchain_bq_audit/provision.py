"""Idempotent provisioning from `schema.py`: dataset, table, views, additive migration.

Used by `bq-audit init` and by the writer: the dataset and table before its first write,
the views after it (`auto_create_views`), so the first rows do not wait for the views. A
table made by an older version (or by the seed's five-column Pulumi program) gets the
missing columns added as NULLABLE, leaving its rows alone; a column of the wrong type
stops with an error naming it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from . import schema, views
from .settings import AuditSettings

NOT_A_VIEW = "not a view, left alone"


class SchemaMismatchError(Exception):
    """The existing table has a column whose type differs from `schema.py`'s."""


@dataclass
class ProvisionReport:
    """What `ensure_table` found and did."""

    table_id: str
    created_dataset: bool = False
    created_table: bool = False
    added_columns: list[str] = field(default_factory=list)
    views: dict[str, str] = field(default_factory=dict)  # view id -> created/updated/ok
    digest_table: str | None = None  # "created", "added columns ...", "up to date"; None: not asked
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A readable account, one line a fact."""
        dataset = self.table_id.rsplit(".", 1)[0]
        out = [f"dataset {dataset}: {'created' if self.created_dataset else 'exists'}"]
        if self.created_table:
            out.append(f"table {self.table_id}: created")
        elif self.added_columns:
            out.append(f"table {self.table_id}: added columns {', '.join(self.added_columns)}")
        else:
            out.append(f"table {self.table_id}: up to date")
        out += [f"view {name}: {state}" for name, state in self.views.items()]
        if self.digest_table is not None:
            out.append(f"table {self.table_id}{schema.DIGEST_TABLE_SUFFIX}: {self.digest_table}")
        return out + [f"note: {note}" for note in self.notes]


def table_id(client: Any, settings: AuditSettings) -> str:
    """`project.dataset.table` of the audit table for this client."""
    return f"{settings.project or client.project}.{settings.dataset}.{settings.table}"


def build_table(client: Any, settings: AuditSettings, digests: bool = False) -> Any:
    """The `bigquery.Table` of `schema.table_definition` (or, with `digests`, of
    `schema.digest_table_definition`): schema, partitioning, clustering, retention, labels,
    description."""
    from google.cloud import bigquery

    if digests:
        spec = schema.digest_table_definition(settings.retention_days, settings.label_map)
        full_id = table_id(client, settings) + schema.DIGEST_TABLE_SUFFIX
        fields = schema.to_schema_fields(schema.DIGEST_COLUMNS)
    else:
        spec = schema.table_definition(settings.retention_days, settings.label_map)
        full_id, fields = table_id(client, settings), schema.to_schema_fields()
    table = bigquery.Table(full_id, schema=fields)
    part = spec["time_partitioning"]
    table.time_partitioning = bigquery.TimePartitioning(
        type_=part["type"], field=part["field"], expiration_ms=part["expiration_ms"]
    )
    table.clustering_fields = spec["clustering"] or None
    table.description = spec["description"]
    table.labels = spec["labels"]
    return table


def missing_columns(
    existing: list[Any], columns: tuple[schema.Column, ...] = schema.COLUMNS
) -> tuple[list[Any], list[str]]:
    """`columns` absent from `existing` SchemaFields, and type mismatches."""
    from google.cloud import bigquery

    have = {f.name.lower(): f for f in existing}
    add, wrong = [], []
    for col in columns:
        found = have.get(col.name.lower())
        if found is None:
            # a column added to an existing table cannot be REQUIRED
            mode = "REPEATED" if col.mode == "REPEATED" else "NULLABLE"
            add.append(bigquery.SchemaField(col.name, col.type, mode=mode,
                                            description=col.description))  # fmt: skip
        elif schema.normalize_type(found.field_type) != col.type:
            wrong.append(
                f"{found.name} is {schema.normalize_type(found.field_type)}, expected {col.type}"
            )
    return add, wrong


def ensure_table(
    client: Any,
    settings: AuditSettings,
    timeout: float = 30.0,
    retry: bool = True,
    digests: bool | None = None,
    views: bool = True,
) -> ProvisionReport:
    """Create what is missing (dataset, table, with `views` the views, and the digests table
    when `digests`, by default when `settings` has a digest key) and migrate an older table.

    Each request times out after `timeout`; with `retry`, transient errors are retried for
    up to `timeout` too (the writer passes False: its own retry loop bounds the time).
    Raises `SchemaMismatchError` when a column has the wrong type.
    """
    from google.api_core.exceptions import Conflict, NotFound
    from google.cloud import bigquery

    opts: dict[str, Any] = {
        "retry": bigquery.DEFAULT_RETRY.with_deadline(timeout) if retry else None,
        "timeout": timeout,
    }
    full_id = table_id(client, settings)
    report = ProvisionReport(full_id)

    dataset_id = full_id.rsplit(".", 1)[0]
    try:
        client.get_dataset(dataset_id, **opts)
    except NotFound:
        dataset = bigquery.Dataset(dataset_id)
        dataset.location = settings.location
        dataset.description = schema.DATASET_DESCRIPTION
        dataset.labels = {**schema.DEFAULT_LABELS, **settings.label_map}
        dataset.default_partition_expiration_ms = schema.retention_ms(settings.retention_days)
        try:
            client.create_dataset(dataset, **opts)
            report.created_dataset = True
        except Conflict:  # another process made it a moment ago
            pass

    try:
        table = client.get_table(full_id, **opts)
    except NotFound:
        try:
            client.create_table(build_table(client, settings), **opts)
            report.created_table = True
        except Conflict:
            table = client.get_table(full_id, **opts)
    if not report.created_table:
        add, wrong = missing_columns(list(table.schema))
        if wrong:
            raise SchemaMismatchError(
                f"table {full_id} does not match the audit schema: {'; '.join(wrong)}. "
                "Fix or rename those columns, or write to another table (BQ_AUDIT_TABLE)."
            )
        if add:
            table.schema = list(table.schema) + add
            client.update_table(table, ["schema"], **opts)
            report.added_columns = [f.name for f in add]
        if table.time_partitioning is None:
            report.notes.append(
                f"{full_id} is not partitioned (made by an older tool); BigQuery cannot "
                "partition a table in place: copy it into a new table to get partitioning"
            )

    if views:
        report.views = _ensure_views(client, full_id, opts)
        report.notes += views_left_alone(report.views)
    if settings.signs_digests if digests is None else digests:
        report.digest_table = _ensure_digest_table(client, settings, opts)
    return report


def ensure_views(client: Any, settings: AuditSettings, timeout: float = 30.0) -> dict[str, str]:
    """Create or update the views of `settings`' table (which must exist): view id ->
    created/updated/ok. What the writer does after its first write (rows before views)."""
    opts: dict[str, Any] = {"retry": None, "timeout": timeout}
    return _ensure_views(client, table_id(client, settings), opts)


def views_made(client: Any, settings: AuditSettings, timeout: float = 30.0) -> bool:
    """Whether every view of `settings`' table is there, as a view (False too when that
    cannot be told: BigQuery unreachable)."""
    opts: dict[str, Any] = {"retry": None, "timeout": timeout}
    try:
        full_id = table_id(client, settings)
        return all(
            client.get_table(full_id + suffix, **opts).table_type == "VIEW"
            for suffix in views.VIEWS
        )
    except Exception:
        return False


def _ensure_views(client: Any, full_id: str, opts: dict[str, Any]) -> dict[str, str]:
    return {
        view_id: _ensure_view(client, view_id, query, description, opts)
        for view_id, (query, description) in views.view_queries(full_id).items()
    }


def views_left_alone(states: dict[str, str]) -> list[str]:
    """One line for each view name that something else (a table) holds: never replaced."""
    return [
        f"{view_id} is not a view: left alone (rename it to get this view)"
        for view_id, state in states.items()
        if state == NOT_A_VIEW
    ]


def _ensure_digest_table(client: Any, settings: AuditSettings, opts: dict[str, Any]) -> str:
    """Create or migrate `<table>_digests` (digests.py); what was done, as words."""
    from google.api_core.exceptions import Conflict, NotFound

    full_id = table_id(client, settings) + schema.DIGEST_TABLE_SUFFIX
    try:
        table = client.get_table(full_id, **opts)
    except NotFound:
        try:
            client.create_table(build_table(client, settings, digests=True), **opts)
            return "created"
        except Conflict:
            table = client.get_table(full_id, **opts)
    add, wrong = missing_columns(list(table.schema), schema.DIGEST_COLUMNS)
    if wrong:
        raise SchemaMismatchError(f"table {full_id} is not a digests table: {'; '.join(wrong)}")
    if add:
        table.schema = list(table.schema) + add
        client.update_table(table, ["schema"], **opts)
        return f"added columns {', '.join(f.name for f in add)}"
    return "up to date"


def _ensure_view(client: Any, view_id: str, query: str, description: str,
                 opts: dict[str, Any]) -> str:  # fmt: skip
    from google.api_core.exceptions import Conflict, NotFound
    from google.cloud import bigquery

    try:
        view = client.get_table(view_id, **opts)
    except NotFound:
        view = bigquery.Table(view_id)
        view.view_query = query
        view.description = description
        try:
            client.create_table(view, **opts)
        except Conflict:
            return "ok"
        return "created"
    if view.table_type != "VIEW":
        return NOT_A_VIEW  # a table (say, the user's own) where the view belongs: kept
    if view.view_query != query:
        view.view_query = query
        view = client.update_table(view, ["view_query"], **opts)
        if not _has_columns(client, view, query, opts):
            # the embedded BigQuery keeps a view's old schema on update (real BigQuery
            # recomputes it): made again, the view has the new query's columns
            client.delete_table(view_id, not_found_ok=True, **opts)
            fresh = bigquery.Table(view_id)
            fresh.view_query, fresh.description = query, description
            with contextlib.suppress(Conflict):
                client.create_table(fresh, **opts)
        return "updated"
    return "ok"


def _has_columns(client: Any, view: Any, query: str, opts: dict[str, Any]) -> bool:
    """True when `view` (as `update_table` returned it) has the columns its query gives
    (a query of no rows)."""
    from google.cloud import bigquery

    probe = client.query(
        f"SELECT * FROM ({query}) LIMIT 0", job_config=bigquery.QueryJobConfig(), **opts
    ).result(timeout=opts.get("timeout"))
    wanted = {field.name for field in probe.schema}
    return wanted <= {field.name for field in view.schema}
