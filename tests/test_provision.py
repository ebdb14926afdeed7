"""Provisioning on the real local BigQuery: `bq-audit init`, the writer's first write and the
Pulumi component build one table; seed tables migrate in place; the views answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from google.cloud import bigquery
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage

from langchain_bq_audit import BigQueryAuditHandler, schema, views
from langchain_bq_audit.pulumi_infra import AuditLogInfra

from .conftest import query, wait_for
from .pulumi_mocks import declare, pulumi_table_definition

DATASET = "language_model_logging"
SEED_SCHEMA = [  # the original Pulumi program's table
    bigquery.SchemaField("timestamp", "TIMESTAMP", mode="REQUIRED"),
    bigquery.SchemaField("input_text", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("output_text", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("user_id", "STRING", mode="NULLABLE"),
    bigquery.SchemaField("session_id", "STRING", mode="NULLABLE"),
]


def cli(emulator: Any, *args: str) -> subprocess.CompletedProcess[str]:
    # init's requests may wait on a busy emulator longer than its default 30 s each
    slow = ("--timeout", "120") if args[0] == "init" else ()
    return subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", *args, *slow, "--endpoint",
         emulator.host_port],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def definition_of(table: Any) -> dict[str, Any]:
    """A table read back from BigQuery in `schema.table_definition`'s shape."""
    part = table.time_partitioning
    return {
        "schema": [
            {"name": f.name, "type": schema.normalize_type(f.field_type), "mode": f.mode,
             "description": f.description}
            for f in table.schema
        ],
        "time_partitioning": {
            "type": part.type_,
            "field": part.field,
            "expiration_ms": None if part.expiration_ms is None else int(part.expiration_ms),
        },
        "clustering": table.clustering_fields,
        "description": table.description,
        "labels": table.labels,
    }  # fmt: skip


def dataset_definition(made: Any) -> dict[str, Any]:
    """What the three makers must agree on for a dataset: a BigQuery `Dataset` read back, or
    the inputs of Pulumi's (camelCase)."""
    if isinstance(made, dict):
        got = [made.get(k) for k in ("location", "description", "labels")]
        expiration = made.get("defaultPartitionExpirationMs")
    else:
        got = [made.location, made.description, made.labels]
        expiration = made.default_partition_expiration_ms
    return {
        **dict(zip(("location", "description", "labels"), got, strict=True)),
        "default_partition_expiration_ms": None if expiration is None else int(expiration),
    }


@pytest.mark.usefixtures("writer_makes_views")
def test_init_the_writer_and_pulumi_build_the_same_table(
    emulator, bq_client, table_name, mocks
) -> None:
    # Datasets of this test's own: the shared default dataset is made first by whichever test
    # of the worker comes first, often a plain `create_dataset`, so its description says
    # nothing about the maker under test.
    by = {"init": f"d_{table_name}_init", "writer": f"d_{table_name}_writer"}
    expected = schema.table_definition(30, {"team": "ml"})

    proc = cli(emulator, "init", "--dataset", by["init"], "--table", table_name,
               "--retention-days", "30", "--labels", "team=ml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"dataset local.{by['init']}: created" in proc.stdout, proc.stdout
    assert f"table local.{by['init']}.{table_name}: created" in proc.stdout
    for suffix in views.VIEWS:  # every view (`_otel`, `_nodes`, ...); Pulumi's: test_infra.py
        assert f"view local.{by['init']}.{table_name}{suffix}: created" in proc.stdout
    by_init = bq_client.get_table(f"{bq_client.project}.{by['init']}.{table_name}")

    handler = BigQueryAuditHandler(client=bq_client, dataset=by["writer"], table=table_name,
                                   retention_days=30, labels="team=ml")  # fmt: skip
    FakeListChatModel(responses=["x"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    by_writer = bq_client.get_table(f"{bq_client.project}.{by['writer']}.{table_name}")

    declare(lambda: AuditLogInfra("audit", retention_days=30, labels={"team": "ml"}))
    tables = {t["tableId"]: t for t in mocks.of_type("gcp:bigquery/table:Table")}
    by_pulumi = tables["inference_logs"]

    assert definition_of(by_init) == expected
    assert definition_of(by_writer) == expected
    assert pulumi_table_definition(by_pulumi) == expected
    # the signed digests' table too, by init and by Pulumi (clustering: none)
    digests = schema.digest_table_definition(30, {"team": "ml"})
    by_init_digests = definition_of(
        bq_client.get_table(f"{bq_client.project}.{by['init']}.{table_name}_digests")
    )
    assert {**by_init_digests, "clustering": by_init_digests["clustering"] or []} == digests
    assert pulumi_table_definition(tables["inference_logs_digests"]) == digests

    # the dataset each made: US, described, labelled, and expiring partitions by default
    expected_dataset = {
        "location": "US",
        "description": schema.DATASET_DESCRIPTION,
        "labels": expected["labels"],
        "default_partition_expiration_ms": expected["time_partitioning"]["expiration_ms"],
    }
    for name in by.values():
        made = bq_client.get_dataset(f"{bq_client.project}.{name}")
        assert dataset_definition(made) == expected_dataset, name
    (pulumi_dataset,) = mocks.of_type("gcp:bigquery/dataset:Dataset")
    assert dataset_definition(pulumi_dataset) == expected_dataset

    again = cli(emulator, "init", "--dataset", by["init"], "--table", table_name)  # idempotent
    assert again.returncode == 0, again.stderr
    assert f"table local.{by['init']}.{table_name}: up to date" in again.stdout
    assert "created" not in again.stdout and "updated" not in again.stdout
    assert (
        definition_of(bq_client.get_table(f"{bq_client.project}.{by['init']}.{table_name}"))
        == expected
    )


def make_seed_table(bq_client: Any, name: str, fields: list[Any] = SEED_SCHEMA) -> str:
    bq_client.create_dataset(f"{bq_client.project}.{DATASET}", exists_ok=True)
    full = f"{bq_client.project}.{DATASET}.{name}"
    bq_client.create_table(bigquery.Table(full, schema=fields))
    errors = bq_client.insert_rows_json(full, [
        {"timestamp": "2026-01-02T03:04:05+00:00", "input_text": "old question",
         "output_text": "old answer", "user_id": "u-old", "session_id": "s-old"},
    ])  # fmt: skip
    assert errors == []
    return full


def test_init_migrates_the_seed_table_without_touching_its_rows(
    emulator, bq_client, table_name
) -> None:
    full = make_seed_table(bq_client, table_name)
    proc = cli(emulator, "init", "--table", table_name)
    assert proc.returncode == 0, proc.stderr
    added = [c.name for c in schema.COLUMNS[5:]]
    assert f"added columns {', '.join(added)}" in proc.stdout
    assert "is not partitioned" in proc.stdout  # said, since it cannot be fixed in place

    table = bq_client.get_table(full)
    assert [f.name for f in table.schema] == [c.name for c in schema.COLUMNS]
    modes = {f.name: f.mode for f in table.schema}
    assert modes["event_id"] == "NULLABLE" and modes["tags"] == "REPEATED"
    assert modes["timestamp"] == "REQUIRED"  # the seed's columns keep their modes
    (old,) = query(bq_client, f"SELECT * FROM `{full}`")
    assert (old["input_text"], old["output_text"], old["user_id"]) == (
        "old question", "old answer", "u-old")  # fmt: skip
    assert old["event_id"] is None and old["tags"] == []

    again = cli(emulator, "init", "--table", table_name)
    assert "up to date" in again.stdout


def test_the_writer_migrates_the_seed_table_on_first_start(bq_client, table_name) -> None:
    full = make_seed_table(bq_client, table_name)
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, batch_age_s=0.05)
    FakeListChatModel(responses=["new answer"]).invoke("new question",
                                                       config={"callbacks": [handler]})  # fmt: skip
    assert handler.flush(timeout=60)
    rows = query(bq_client, f"SELECT input_text, output_text, run_type FROM `{full}` "
                            "ORDER BY timestamp")  # fmt: skip
    assert rows == [
        {"input_text": "old question", "output_text": "old answer", "run_type": None},
        {"input_text": "user: new question", "output_text": "new answer",
         "run_type": "chat_model"},
    ]  # fmt: skip
    handler.close()


def test_a_column_of_the_wrong_type_is_named(emulator, bq_client, table_name, tmp_path) -> None:
    fields = [*SEED_SCHEMA[:3], bigquery.SchemaField("user_id", "INT64"), SEED_SCHEMA[4]]
    bq_client.create_dataset(f"{bq_client.project}.{DATASET}", exists_ok=True)
    bq_client.create_table(
        bigquery.Table(f"{bq_client.project}.{DATASET}.{table_name}", schema=fields)
    )

    proc = cli(emulator, "init", "--table", table_name)
    assert proc.returncode == 1
    assert "user_id is INT64, expected STRING" in proc.stderr
    assert "Traceback" not in proc.stderr

    # the writer keeps the rows (spooled) and says why in its last error
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, batch_age_s=0.05,
                                   batch_deadline_s=0.5, spool_dir=str(tmp_path))  # fmt: skip
    FakeListChatModel(responses=["x"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60) is False
    stats = handler.stats()
    assert stats["spooled"] == 1 and stats["dropped"] == 0
    assert "user_id is INT64, expected STRING" in stats["last_error"]
    handler.close(timeout=1)


@pytest.mark.usefixtures("writer_makes_views")
def test_views_answer_from_rows_written_by_the_handler(bq_client, table_name, read_rows) -> None:
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, batch_age_s=0.05)

    def model(tokens: int) -> Any:
        usage = {"input_tokens": tokens, "output_tokens": 1, "total_tokens": tokens + 1}
        msg = AIMessage("a", usage_metadata=usage, response_metadata={"model_name": "m-1"})
        return GenericFakeChatModel(messages=iter([msg]))

    def call(session: str, user: str, tokens: int) -> None:
        meta = {"session_id": session, "user_id": user}
        model(tokens).invoke("q", config={"callbacks": [handler], "metadata": meta})

    call("s-1", "ana", 10)
    call("s-1", "ana", 20)
    call("s-1", "bob", 30)
    call("s-2", "bob", 40)
    broken = GenericFakeChatModel(messages=iter([]))  # no answer left: the call fails
    with pytest.raises(Exception):  # noqa: B017 - which exception is LangChain's business
        broken.invoke(
            "boom",
            config={"callbacks": [handler], "metadata": {"session_id": "s-2", "user_id": "bob"}},
        )
    assert handler.flush(timeout=60)
    # a replayed copy of one row (same event id, as after a retry): views must not count it
    (first,) = read_rows("prompt_tokens = 10")
    copy = {k: v for k, v in first.items() if v is not None}
    copy = json.loads(json.dumps(copy, default=str))
    assert bq_client.insert_rows_json(f"{bq_client.project}.{DATASET}.{table_name}", [copy]) == []
    base = f"{bq_client.project}.{DATASET}.{table_name}"

    assert query(bq_client, f"SELECT COUNT(*) AS n FROM `{base}`")[0]["n"] == 6
    assert query(bq_client, f"SELECT COUNT(*) AS n FROM `{base}_dedup`")[0]["n"] == 5

    sessions = {r["session_id"]: r for r in query(bq_client, f"SELECT * FROM `{base}_sessions`")}
    s1, s2 = sessions["s-1"], sessions["s-2"]
    assert (s1["calls"], s1["prompt_tokens"], s1["total_tokens"], s1["errors"]) == (3, 60, 63, 0)
    assert (s1["users"], sorted(s1["user_ids"])) == (2, ["ana", "bob"])
    assert (s2["calls"], s2["prompt_tokens"], s2["errors"], s2["user_ids"]) == (2, 40, 1, ["bob"])
    assert s1["first_time"] <= s1["last_time"]

    usage = query(bq_client, f"SELECT * FROM `{base}_daily_usage` WHERE model_name = 'm-1' "
                             "ORDER BY user_id")  # fmt: skip
    assert [(u["user_id"], u["calls"], u["prompt_tokens"]) for u in usage] == [
        ("ana", 2, 30), ("bob", 2, 70)]  # fmt: skip
    assert all(0 <= u["p50_latency_ms"] <= u["p95_latency_ms"] for u in usage)

    (error,) = query(bq_client, f"SELECT * FROM `{base}_errors`")
    assert (error["session_id"], error["user_id"], error["run_type"]) == ("s-2", "bob",
                                                                         "chat_model")  # fmt: skip
    assert error["error_type"] and error["input_text"] == "user: boom"
    handler.close()


def test_schema_sql_creates_the_same_table(emulator, bq_client, table_name) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "schema", "--format", "sql",
         "--project", bq_client.project, "--table", table_name],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bq_client.create_dataset(f"{bq_client.project}.{DATASET}", exists_ok=True)
    bq_client.query(proc.stdout, job_retry=None).result(timeout=60)
    made = definition_of(bq_client.get_table(f"{bq_client.project}.{DATASET}.{table_name}"))
    expected = schema.table_definition()
    assert made["schema"] == expected["schema"]
    assert made["time_partitioning"]["field"] == "timestamp"
    assert made["clustering"] == expected["clustering"]
    assert made["description"] == expected["description"]


def test_the_writer_makes_the_views_after_its_rows_and_a_view_it_cannot_make_costs_no_row(
    proxy, bq_client, table_name, read_rows, caplog
) -> None:
    from langchain_bq_audit.client import make_client
    from langchain_bq_audit.settings import AuditSettings

    base = f"{bq_client.project}.{DATASET}.{table_name}"
    # creating a view is forbidden (403) for this writer; every other request goes through
    proxy.refuse(b'"view": {', 403)
    client = make_client(AuditSettings(emulator_host=proxy.host_port, project=proxy.project))
    handler = BigQueryAuditHandler(client=client, table=table_name, auto_create_views=True)
    FakeListChatModel(responses=["a"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)  # the row is written, whatever became of the views
    assert [r["output_text"] for r in read_rows("run_type = 'chat_model'")] == ["a"]
    assert handler.stats()["written"] == 1
    assert proxy.answered >= 1  # a view was asked for, after the row
    assert f"the views of {base} were not made" in caplog.text
    assert "bq-audit init" in caplog.text
    handler.close()
    proxy.refuse(None)
    # what the warning says to do makes them
    from langchain_bq_audit.provision import ensure_table

    report = ensure_table(bq_client, AuditSettings(table=table_name))
    assert set(report.views.values()) == {"created"}


def test_a_table_where_a_view_belongs_is_left_alone_with_its_rows(
    bq_client, table_name, read_rows, caplog
) -> None:
    base = f"{bq_client.project}.{DATASET}.{table_name}"
    bq_client.create_dataset(f"{bq_client.project}.{DATASET}", exists_ok=True)
    mine = bigquery.Table(f"{base}_sessions", schema=[bigquery.SchemaField("mine", "STRING")])
    bq_client.create_table(mine)
    assert bq_client.insert_rows_json(f"{base}_sessions", [{"mine": "precious"}]) == []
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, auto_create_views=True)
    FakeListChatModel(responses=["a"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    handler.close()
    assert [r["output_text"] for r in read_rows("run_type = 'chat_model'")] == ["a"]
    assert f"{base}_sessions is not a view: left alone" in caplog.text
    assert query(bq_client, f"SELECT mine FROM `{base}_sessions`") == [{"mine": "precious"}]
    assert bq_client.get_table(f"{base}_sessions").table_type == "TABLE"
    assert bq_client.get_table(f"{base}_dedup").table_type == "VIEW"  # the others are made
    # and `bq-audit init` says so too, without touching it
    from langchain_bq_audit.provision import ensure_table
    from langchain_bq_audit.settings import AuditSettings

    report = ensure_table(bq_client, AuditSettings(table=table_name))
    assert f"note: {base}_sessions is not a view: left alone" in "\n".join(report.lines())
    assert query(bq_client, f"SELECT mine FROM `{base}_sessions`") == [{"mine": "precious"}]


def test_rows_keep_flowing_while_the_views_hang(proxy, bq_client, table_name, read_rows) -> None:
    from google.api_core.exceptions import NotFound

    from langchain_bq_audit.client import make_client
    from langchain_bq_audit.settings import AuditSettings

    # creating a view hangs (120 s a try); the rest is fine. The rows are awaited for less
    # than one try: they come while the views hang, however loaded the machine is.
    proxy.refuse(b'"view": {', None)
    client = make_client(AuditSettings(emulator_host=proxy.host_port, project=proxy.project))
    handler = BigQueryAuditHandler(client=client, table=table_name, auto_create_views=True,
                                   batch_age_s=0.05, request_timeout_s=120)  # fmt: skip
    model = FakeListChatModel(responses=["a"])
    for i in range(10):
        model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": f"u{i}"}})
        time.sleep(0.1)  # a batch a call or so: later batches would queue behind the views
    wait_for(lambda: len(read_rows()) == 10, 90, "every row while the views hang")
    stats = handler.stats()
    assert stats["written"] == 10 and stats["spooled"] == stats["dropped"] == 0
    with pytest.raises(NotFound):  # still hanging: the rows did not wait for it
        bq_client.get_table(f"{bq_client.project}.{DATASET}.{table_name}_dedup")
    # about rows: written, though the views are not there (it waits for them this long)
    assert handler.flush(timeout=10)
    handler.close(timeout=1)


def test_auto_create_views_off_makes_the_table_and_no_view(bq_client, table_name) -> None:
    from google.api_core.exceptions import NotFound

    handler = BigQueryAuditHandler(client=bq_client, table=table_name, auto_create_views=False)
    FakeListChatModel(responses=["a"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    handler.close()
    base = f"{bq_client.project}.{DATASET}.{table_name}"
    assert bq_client.get_table(base).num_rows is not None
    for view_id in views.view_queries(base):
        with pytest.raises(NotFound):
            bq_client.get_table(view_id)


@pytest.mark.usefixtures("writer_makes_views")
def test_a_short_script_on_a_new_table_leaves_every_view(emulator, bq_client, table_name) -> None:
    """A script that makes a few calls on a brand-new table and exits without `flush()`:
    its exit drain waits for the views, so every view is there when it ends (README,
    Infrastructure), or it says at exit that they are not all made, naming `bq-audit init`.
    Here BigQuery takes 8 s to make a view (the `bq-audit emulator` CLI's local BigQuery
    takes about 1 s), so the six views need more than the drain's 30 s; the drain's first
    write (the table, maybe the dataset) has those 30 s. With the default 5 s, a loaded
    machine's first write may not end in time: the row is spooled and no view is begun."""
    script = textwrap.dedent(f"""
        import time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler, provision
        make_view = provision._ensure_view
        def slow_view(*args, **kwargs):
            time.sleep(8)
            return make_view(*args, **kwargs)
        provision._ensure_view = slow_view
        handler = BigQueryAuditHandler(table="{table_name}", shutdown_timeout_s=30)
        FakeListChatModel(responses=["hi"]).invoke("q", config={{"callbacks": [handler]}})
        """)
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": emulator.host_port}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = query(bq_client, f"SELECT output_text FROM `{bq_client.project}.{DATASET}.{table_name}`")
    assert rows == [{"output_text": "hi"}], proc.stderr  # written by the drain, not spooled
    made = {t.table_id for t in bq_client.list_tables(f"{bq_client.project}.{DATASET}")}
    missing = [suffix for suffix in views.VIEWS if f"{table_name}{suffix}" not in made]
    assert missing == [] or (
        "views" in proc.stderr and "bq-audit init" in proc.stderr
    ), (missing, proc.stderr)  # fmt: skip


def test_rows_of_a_migrated_seed_table_all_count_in_the_views_and_stats(
    emulator, bq_client, table_name
) -> None:
    """The original five-column table's rows have no `event_id`: after `init` migrates it,
    the dedup view (and so every view, `stats` and `sessions`) keeps each of them, not one
    row for all of them (`PARTITION BY event_id` puts every NULL in one partition)."""
    from langchain_bq_audit.reading import summary

    full = make_seed_table(bq_client, table_name)  # one old row, session s-old
    assert bq_client.insert_rows_json(full, [
        {"timestamp": f"2026-01-0{day}T03:04:05+00:00", "input_text": f"old {day}",
         "output_text": "old answer", "user_id": "u-old", "session_id": f"s-old-{day}"}
        for day in (3, 4)
    ]) == []  # fmt: skip
    assert cli(emulator, "init", "--table", table_name).returncode == 0

    assert query(bq_client, f"SELECT COUNT(*) AS n FROM `{full}_dedup`")[0]["n"] == 3
    sessions = query(bq_client, f"SELECT session_id FROM `{full}_sessions`")
    assert sorted(s["session_id"] for s in sessions) == ["s-old", "s-old-3", "s-old-4"]
    stats = summary(bq_client, full)
    assert (stats["rows"], stats["sessions"]) == (3, 3)


def test_views_another_process_made_while_this_one_collided_are_not_warned_about(
    bq_client, table_name, caplog, monkeypatch
) -> None:
    """Two new processes of one table: the second one's requests collide with the first's
    (the local BigQuery resets them: about one run in two of two `bq-audit emulator`
    scripts started at once), but the views are there. No warning to run `bq-audit init`
    for views that exist."""
    from langchain_bq_audit import provision

    real = provision.ensure_views

    def collide(client: Any, settings: Any, timeout: float = 30.0) -> dict[str, str]:
        real(client, settings, timeout=timeout)  # the other process makes them
        raise ConnectionError("('Connection aborted.', ConnectionResetError(104, ...))")

    monkeypatch.setattr(provision, "ensure_views", collide)
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, auto_create_views=True)
    FakeListChatModel(responses=["a"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=60)
    handler.close()
    base = f"{bq_client.project}.{DATASET}.{table_name}"
    assert all(bq_client.get_table(f"{base}{s}").table_type == "VIEW" for s in views.VIEWS)
    # about this table's views: a writer an earlier test of this process left (its views
    # hung behind a proxy that then closed) may warn about its own meanwhile
    assert f"the views of {base} were not made" not in caplog.text
