"""`AuditLogInfra`: the audit dataset, table, views and IAM as one Pulumi component.

Needs the `pulumi` extra (`pip install 'langchain-bq-audit[pulumi]'`). Everything about the
table comes from `schema.table_definition` and `views.py`, the same definitions
`bq-audit init` and the writer use, so the three routes build the same table.

Example (a Pulumi program)::

    from langchain_bq_audit.pulumi_infra import AuditLogInfra

    infra = AuditLogInfra("audit", retention_days=400,
                          writer_members=["serviceAccount:app@my-project.iam.gserviceaccount.com"],
                          reader_members=["group:data@example.com"])
    pulumi.export("table_id", infra.table_id)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_gcp as gcp

from . import schema, views

WRITER_ROLE = "roles/bigquery.dataEditor"
READER_ROLE = "roles/bigquery.dataViewer"


def _slug(member: str) -> str:
    """A resource-name-safe form of an IAM member, stable when the list is reordered."""
    return re.sub(r"[^a-zA-Z0-9-]+", "-", member).strip("-").lower()[:60]


class AuditLogInfra(pulumi.ComponentResource):
    """Dataset, partitioned and clustered table, views, and IAM for the audit log.

    Outputs: `dataset_id`, `table_id` and `full_table_id` (`project.dataset.table`).
    """

    dataset_id: pulumi.Output[str]
    table_id: pulumi.Output[str]
    full_table_id: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        *,
        project: str | None = None,
        dataset_id: str = schema.DEFAULT_DATASET,
        table_id: str = schema.DEFAULT_TABLE,
        location: str = schema.DEFAULT_LOCATION,
        retention_days: int | None = None,
        deletion_protection: bool = True,
        labels: dict[str, str] | None = None,
        writer_members: Sequence[str] = (),
        reader_members: Sequence[str] = (),
        views_enabled: bool = True,
        digests: bool = True,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """Declare the resources.

        Args:
            project: Google Cloud project; None uses the provider's (`gcp:project`).
            retention_days: partition expiration (table and dataset default); None: forever.
            deletion_protection: refuse to delete the table (the seed program had False).
            writer_members: IAM members (`serviceAccount:...`) that write rows: dataEditor
                on the table only.
            reader_members: IAM members that read: dataViewer on the dataset (table and views).
            digests: also make `<table>_digests` for signed digests (digests.py), with a
                binding of its own: writers get dataEditor on it, so that giving someone
                edit rights on the audit table gives none on the digests.
        """
        super().__init__("langchain-bq-audit:index:AuditLogInfra", name, None, opts)
        spec = schema.table_definition(retention_days, labels)
        child = pulumi.ResourceOptions(parent=self)

        dataset = gcp.bigquery.Dataset(
            f"{name}-dataset",
            dataset_id=dataset_id,
            project=project,
            location=location,
            description=schema.DATASET_DESCRIPTION,
            labels=spec["labels"],
            default_partition_expiration_ms=spec["time_partitioning"]["expiration_ms"],
            opts=child,
        )
        part = spec["time_partitioning"]
        table = gcp.bigquery.Table(
            f"{name}-table",
            dataset_id=dataset.dataset_id,
            table_id=table_id,
            project=dataset.project,
            # pulumi_gcp takes the schema as a JSON *string*; a list fails at run time
            schema=json.dumps(spec["schema"]),
            time_partitioning=gcp.bigquery.TableTimePartitioningArgs(
                type=part["type"], field=part["field"], expiration_ms=part["expiration_ms"]
            ),
            clusterings=spec["clustering"],
            description=spec["description"],
            labels=spec["labels"],
            deletion_protection=deletion_protection,
            opts=child,
        )
        full_table_id = pulumi.Output.concat(
            table.project, ".", table.dataset_id, ".", table.table_id
        )

        self.views: dict[str, Any] = {}
        if views_enabled:
            for suffix, (build, description) in views.VIEWS.items():
                self.views[table_id + suffix] = gcp.bigquery.Table(
                    f"{name}-view{suffix.replace('_', '-')}",
                    dataset_id=dataset.dataset_id,
                    table_id=table_id + suffix,
                    project=dataset.project,
                    description=description,
                    view=gcp.bigquery.TableViewArgs(
                        query=full_table_id.apply(build), use_legacy_sql=False
                    ),
                    deletion_protection=False,  # a view holds no data
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[table]),
                )

        self.digest_table: Any = None
        self.digest_writer_bindings: list[Any] = []
        if digests:
            dspec = schema.digest_table_definition(retention_days, labels)
            dpart = dspec["time_partitioning"]
            self.digest_table = gcp.bigquery.Table(
                f"{name}-digests",
                dataset_id=dataset.dataset_id,
                table_id=table_id + schema.DIGEST_TABLE_SUFFIX,
                project=dataset.project,
                schema=json.dumps(dspec["schema"]),
                time_partitioning=gcp.bigquery.TableTimePartitioningArgs(
                    type=dpart["type"], field=dpart["field"], expiration_ms=dpart["expiration_ms"]
                ),
                description=dspec["description"],
                labels=dspec["labels"],
                deletion_protection=deletion_protection,
                opts=child,
            )
            self.digest_writer_bindings = [
                gcp.bigquery.IamMember(
                    f"{name}-digest-writer-{_slug(member)}",
                    project=dataset.project,
                    dataset_id=dataset.dataset_id,
                    table_id=self.digest_table.table_id,
                    role=WRITER_ROLE,
                    member=member,
                    opts=child,
                )
                for member in writer_members
            ]

        self.writer_bindings = [
            gcp.bigquery.IamMember(
                f"{name}-writer-{_slug(member)}",
                project=dataset.project,
                dataset_id=dataset.dataset_id,
                table_id=table.table_id,
                role=WRITER_ROLE,
                member=member,
                opts=child,
            )
            for member in writer_members
        ]
        self.reader_bindings = [
            gcp.bigquery.DatasetIamMember(
                f"{name}-reader-{_slug(member)}",
                project=dataset.project,
                dataset_id=dataset.dataset_id,
                role=READER_ROLE,
                member=member,
                opts=child,
            )
            for member in reader_members
        ]

        self.dataset = dataset
        self.table = table
        self.dataset_id = dataset.dataset_id
        self.table_id = table.table_id
        self.full_table_id = full_table_id
        self.register_outputs(
            {"dataset_id": self.dataset_id, "table_id": self.table_id,
             "full_table_id": full_table_id}
        )  # fmt: skip
