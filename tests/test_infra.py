"""The Pulumi component and the infra/ program, under Pulumi's mocks (no CLI, no cloud)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pulumi

from langchain_bq_audit import schema, views
from langchain_bq_audit.pulumi_infra import AuditLogInfra

from .pulumi_mocks import PROJECT, Recorder, declare, pulumi_table_definition

PROGRAM = Path(__file__).parent.parent / "infra" / "__main__.py"


def test_component_declares_every_resource_and_property(mocks: Recorder) -> None:
    writer = "serviceAccount:app@my-project.iam.gserviceaccount.com"
    readers = ["group:data@example.com", "user:ana@example.com"]
    outputs = declare(lambda: AuditLogInfra(
        "audit", project="my-project", retention_days=30, labels={"team": "ml"},
        writer_members=[writer], reader_members=readers,
    ))  # fmt: skip
    assert outputs == {
        "dataset_id": "language_model_logging",
        "table_id": "inference_logs",
        "full_table_id": "my-project.language_model_logging.inference_logs",
    }

    (dataset,) = mocks.of_type("gcp:bigquery/dataset:Dataset")
    assert dataset["datasetId"] == "language_model_logging"
    assert dataset["project"] == "my-project"
    assert dataset["location"] == "US"
    assert dataset["description"] == "Dataset to store logs of large language model inferences"
    assert dataset["labels"] == {"managed-by": "langchain-bq-audit", "team": "ml"}
    assert int(dataset["defaultPartitionExpirationMs"]) == 30 * 86_400_000

    tables = {t["tableId"]: t for t in mocks.of_type("gcp:bigquery/table:Table")}
    table = tables.pop("inference_logs")
    assert isinstance(table["schema"], str)  # a JSON string, as pulumi_gcp requires
    assert json.loads(table["schema"]) == schema.to_api_json()
    assert pulumi_table_definition(table) == schema.table_definition(30, {"team": "ml"})
    assert table["deletionProtection"] is True
    assert table["datasetId"] == "language_model_logging"
    digests = tables.pop("inference_logs_digests")
    assert pulumi_table_definition(digests) == schema.digest_table_definition(30, {"team": "ml"})
    assert digests["deletionProtection"] is True

    full = "my-project.language_model_logging.inference_logs"
    assert {k: v["view"]["query"] for k, v in tables.items()} == {
        k.rsplit(".", 1)[1]: q for k, (q, _) in views.view_queries(full).items()
    }
    assert all(v["view"]["useLegacySql"] is False for v in tables.values())

    # writers get dataEditor on the table and, by a binding of its own, on the digests table
    bindings = mocks.of_type("gcp:bigquery/iamMember:IamMember")
    assert sorted((b["datasetId"], b["tableId"], b["role"], b["member"]) for b in bindings) == [
        ("language_model_logging", "inference_logs", "roles/bigquery.dataEditor", writer),
        ("language_model_logging", "inference_logs_digests", "roles/bigquery.dataEditor", writer),
    ]
    reader_bindings = mocks.of_type("gcp:bigquery/datasetIamMember:DatasetIamMember")
    assert sorted(b["member"] for b in reader_bindings) == readers
    assert {b["role"] for b in reader_bindings} == {"roles/bigquery.dataViewer"}


def test_component_defaults_keep_data_forever_and_protect_the_table(mocks: Recorder) -> None:
    outputs = declare(lambda: AuditLogInfra("audit"))
    assert outputs["full_table_id"] == "provider-project.language_model_logging.inference_logs"
    (dataset,) = mocks.of_type("gcp:bigquery/dataset:Dataset")
    assert dataset.get("defaultPartitionExpirationMs") is None
    table = next(
        t for t in mocks.of_type("gcp:bigquery/table:Table") if t["tableId"] == "inference_logs"
    )
    assert pulumi_table_definition(table) == schema.table_definition()
    assert table["deletionProtection"] is True
    assert not mocks.of_type("gcp:bigquery/iamMember:IamMember")


def test_infra_program_reads_its_config_and_exports_what_the_seed_exported(
    mocks: Recorder,
) -> None:
    pulumi.runtime.set_all_config({
        f"{PROJECT}:retentionDays": "90",
        f"{PROJECT}:deletionProtection": "false",  # the seed program's setting stays possible
        f"{PROJECT}:writerMembers": json.dumps(["serviceAccount:w@p.iam.gserviceaccount.com"]),
        f"{PROJECT}:readerMembers": json.dumps(["group:r@example.com"]),
        "gcp:project": "config-project",
    })  # fmt: skip
    try:
        outputs = declare(lambda: runpy.run_path(str(PROGRAM))["infra"])
        stack_outputs = pulumi.runtime.settings.get_root_resource().outputs  # type: ignore[union-attr]
    finally:
        pulumi.runtime.set_all_config({})
    assert outputs["full_table_id"] == "config-project.language_model_logging.inference_logs"
    assert {"dataset_id", "table_id"} <= set(stack_outputs)
    table = next(
        t for t in mocks.of_type("gcp:bigquery/table:Table") if t["tableId"] == "inference_logs"
    )
    assert table["deletionProtection"] is False
    assert int(table["timePartitioning"]["expirationMs"]) == 90 * 86_400_000
    writers = mocks.of_type("gcp:bigquery/iamMember:IamMember")
    assert sorted((w["tableId"], w["member"]) for w in writers) == [
        ("inference_logs", "serviceAccount:w@p.iam.gserviceaccount.com"),
        ("inference_logs_digests", "serviceAccount:w@p.iam.gserviceaccount.com"),
    ]
    (reader,) = mocks.of_type("gcp:bigquery/datasetIamMember:DatasetIamMember")
    assert reader["member"] == "group:r@example.com"


def test_component_can_leave_the_digests_table_out(mocks: Recorder) -> None:
    writer = "serviceAccount:app@my-project.iam.gserviceaccount.com"
    declare(lambda: AuditLogInfra("audit", digests=False, writer_members=[writer]))
    tables = [t["tableId"] for t in mocks.of_type("gcp:bigquery/table:Table")]
    assert "inference_logs_digests" not in tables
    (binding,) = mocks.of_type("gcp:bigquery/iamMember:IamMember")
    assert binding["tableId"] == "inference_logs"
