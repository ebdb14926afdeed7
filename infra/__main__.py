"""The audit log's infrastructure: what the original program made, made correct and complete.

pulumi config set gcp:project my-project
pulumi config set retentionDays 400
pulumi config set --path 'writerMembers[0]' serviceAccount:app@my-proj.iam.gserviceaccount.com
pulumi up
"""

import pulumi

from langchain_bq_audit.pulumi_infra import AuditLogInfra

config = pulumi.Config()
gcp_config = pulumi.Config("gcp")

infra = AuditLogInfra(
    "audit-log",
    project=gcp_config.get("project"),
    location=config.get("location") or "US",
    retention_days=config.get_int("retentionDays"),
    deletion_protection=config.get_bool("deletionProtection", True),
    writer_members=config.get_object("writerMembers") or [],
    reader_members=config.get_object("readerMembers") or [],
)

pulumi.export("dataset_id", infra.dataset_id)
pulumi.export("table_id", infra.table_id)
pulumi.export("full_table_id", infra.full_table_id)
