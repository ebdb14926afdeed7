"""The Storage Write API sink (`sink="write_api"`) on the emulator's gRPC port, with faults."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.integrity import verify
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.spool import read_segment

from .conftest import (
    assert_accounted,
    create_table_with_required_user,
    delivered,
    query,
    wait_for,
)
from .proxy import FaultProxy

DATASET = "language_model_logging"


def rows_of(bq_client: Any, table: str, view: str = "") -> list[dict[str, Any]]:
    return query(
        bq_client, f"SELECT * FROM `{bq_client.project}.{DATASET}.{table}{view}` ORDER BY seq"
    )


def test_rows_written_through_the_write_api_equal_insert_all_rows(
    emulator, bq_client, table_name, tmp_path
) -> None:
    chain = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])
    chain = chain | FakeListChatModel(responses=["ünïcode ✓ answer"]) | StrOutputParser()
    tables = {"insert_all": f"{table_name}_ia", "write_api": f"{table_name}_wa"}
    for sink, table in tables.items():
        handler = BigQueryAuditHandler(
            client=bq_client, table=table, sink=sink, write_api_host=emulator.grpc_target,
            spool_dir=str(tmp_path / sink), session_id="s-1",
        )  # fmt: skip
        for i in range(50):
            config = {
                "callbacks": [handler],
                "tags": ["t1", "t2"],
                "metadata": {"user_id": f"u{i}"},
            }
            chain.invoke({"q": f"question {i}"}, config=config)
        assert handler.flush(timeout=60), handler.stats()
        handler.close()

    by_sink = {sink: rows_of(bq_client, table) for sink, table in tables.items()}
    assert len(by_sink["write_api"]) == len(by_sink["insert_all"]) == 200  # 4 runs a call
    # every column survives the trip: the hash chain over the canonical row verifies
    report = verify(by_sink["write_api"])
    assert report.ok, report.findings
    assert report.rows and sum(report.rows.values()) == 200

    def comparable(row: dict[str, Any]) -> tuple[Any, ...]:
        varying = {"event_id", "run_id", "parent_run_id", "trace_id", "timestamp", "start_time",
                   "latency_ms", "chain_id", "prev_hash", "row_hash", "output_messages",
                   "metadata"}  # fmt: skip
        return tuple(sorted((k, repr(v)) for k, v in row.items() if k not in varying))

    assert sorted(map(comparable, by_sink["write_api"])) == sorted(
        map(comparable, by_sink["insert_all"])
    )
    chat = [r for r in by_sink["write_api"] if r["run_type"] == "chat_model"]
    assert {r["output_text"] for r in chat} == {"ünïcode ✓ answer"}
    assert all({"t1", "t2"} <= set(r["tags"]) and r["session_id"] == "s-1" for r in chat)
    assert chat[0]["input_messages"][0] == {"role": "system", "content": "be brief"}
    assert all(r["timestamp"] >= r["start_time"] for r in by_sink["write_api"])


def test_a_large_batch_goes_as_several_requests_and_lands_whole(
    emulator, bq_client, table_name, tmp_path
) -> None:
    handler = BigQueryAuditHandler(
        client=bq_client, table=table_name, sink="write_api", batch_age_s=3600,
        write_api_host=emulator.grpc_target, spool_dir=str(tmp_path),
    )  # fmt: skip
    big = "x" * 150_000  # 30 rows of 150 KB: a 4.5 MB batch, sent as 5 requests
    model = FakeListChatModel(responses=[big])
    for i in range(30):
        model.invoke(f"q{i}", config={"callbacks": [handler]})
    assert handler.flush(timeout=60), handler.stats()
    rows = rows_of(bq_client, table_name)
    assert sorted(r["input_text"] for r in rows) == sorted(f"user: q{i}" for i in range(30))
    assert all(len(r["output_text"]) == 150_000 for r in rows)
    assert verify(rows).ok
    handler.close()


def test_an_invalid_row_is_dead_lettered_and_its_neighbours_written(
    emulator, bq_client, table_name, tmp_path
) -> None:
    create_table_with_required_user(bq_client, table_name)
    handler = BigQueryAuditHandler(
        client=bq_client, table=table_name, sink="write_api", batch_age_s=3600,
        write_api_host=emulator.grpc_target, spool_dir=str(tmp_path),
    )  # fmt: skip
    model = FakeListChatModel(responses=["r"])
    for user in ["a", "b", None, "d", "e"]:
        meta = {"user_id": user} if user else {}
        model.invoke("q", config={"callbacks": [handler], "metadata": meta})
    assert handler.flush(timeout=60) is False
    stats = handler.stats()
    assert (stats["written"], stats["dead_lettered"], stats["dropped"]) == (4, 1, 0)
    users = query(bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}`")
    assert sorted(r["user_id"] for r in users) == ["a", "b", "d", "e"]
    (dead,) = handler._writer.spool.dead_letters()
    (record,) = read_segment(dead).records
    assert "user_id" in record["error"] and record["row"]["output_text"] == "r"
    handler.close()


@pytest.mark.parametrize("fault", ["reset", "stall"])
@pytest.mark.usefixtures("writer_makes_views")
def test_write_api_outage_spools_then_replays_every_row(
    fault, grpc_proxy, bq_client, table_name, tmp_path
) -> None:
    handler = BigQueryAuditHandler(
        client=bq_client, table=table_name, sink="write_api", spool_dir=str(tmp_path),
        write_api_host=grpc_proxy.host_port, batch_age_s=0.05, request_timeout_s=2.0,
        batch_deadline_s=3.0,
    )  # fmt: skip
    model = FakeListChatModel(responses=["ok"])

    def call(i: int) -> None:
        model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": str(i)}})

    for i in range(100):
        call(i)
    delivered(handler, 100)  # the long-lived call is open and rows flow
    spooled_before = handler.stats()["spooled"]
    grpc_proxy.set_mode(fault)
    for i in range(100, 400):
        call(i)
    started = time.monotonic()
    assert handler.flush(timeout=60) is False  # BigQuery is away: rows go to disk...
    # each attempt is bounded by the request timeout (2 s) and a batch by its deadline (3 s)
    assert time.monotonic() - started < 30, "the flush waited for the whole outage"
    assert handler.stats()["spooled"] - spooled_before == 300
    grpc_proxy.set_mode("pass")
    for i in range(400, 500):
        call(i)
    # ...and are replayed when a probe finds BigQuery again: probes back off to 30 s
    delivered(handler, 500, 180)
    stats = handler.stats()  # rows made while the writer still thought BigQuery away: spooled
    assert_accounted(stats)
    assert stats["replayed"] == stats["spooled"] >= 300 and stats["dropped"] == 0
    assert stats["written"] + stats["spooled"] == stats["accepted"] == 500
    users = query(
        bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}_dedup`"
    )
    assert sorted(int(r["user_id"]) for r in users) == list(range(500))
    handler.close()


def test_write_api_settings_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="write_api_host"):
        AuditSettings(sink="write_api", emulator_host="127.0.0.1:9050")
    with pytest.raises(ValueError, match="sink must be one of insert_all, write_api"):
        AuditSettings(sink="storage")
    settings = AuditSettings.from_env(
        {"BQ_AUDIT_SINK": "write_api", "BQ_AUDIT_WRITE_API_HOST": "127.0.0.1:9060",
         "BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050"}
    )  # fmt: skip
    assert (settings.sink, settings.write_api_host) == ("write_api", "127.0.0.1:9060")


def test_rows_spooled_by_insert_all_replay_through_the_write_api(
    emulator, bq_client, table_name, tmp_path: Path
) -> None:
    # the spool holds rows, not requests: a sink change between processes loses nothing
    dead = FaultProxy(1)  # nothing listens behind it
    try:
        from langchain_bq_audit.client import make_client

        down = make_client(AuditSettings(emulator_host=dead.host_port, project=bq_client.project))
        first = BigQueryAuditHandler(client=down, table=table_name, spool_dir=str(tmp_path),
                                     request_timeout_s=0.5, batch_deadline_s=0.5)  # fmt: skip
        model = FakeListChatModel(responses=["later"])
        for _ in range(20):
            model.invoke("q", config={"callbacks": [first]})
        first.close(timeout=5)
        assert first.stats()["spooled"] == 20
    finally:
        dead.close()
    second = BigQueryAuditHandler(
        client=bq_client, table=table_name, sink="write_api", spool_dir=str(tmp_path),
        write_api_host=emulator.grpc_target,
    )  # fmt: skip
    second._writer.ensure_started()
    wait_for(lambda: second.stats()["replayed"] == 20, 60, "the replay")
    rows = rows_of(bq_client, table_name)
    assert [r["output_text"] for r in rows] == ["later"] * 20 and verify(rows).ok
    second.close()


def test_rows_arrow_cannot_take_are_reported_alone() -> None:
    from langchain_bq_audit.sinks.arrow import encode

    def row(i: int, **extra: Any) -> dict[str, Any]:
        base = {"timestamp": "2026-11-25T10:00:00.000001+00:00", "input_text": f"in{i}",
                "output_text": "out", "event_id": f"e{i}", "tags": None}  # fmt: skip
        return {**base, **extra}

    rows = [row(0), row(1, seq="not a number"), row(2), row(3, output_text=None), row(4)]
    batch, kept, invalid = encode(rows)
    assert kept == [0, 2, 4] and batch.num_rows == 3
    assert set(invalid) == {1, 3}
    assert "seq" in invalid[1] and "output_text" in invalid[3]
    assert batch.column("input_text").to_pylist() == ["in0", "in2", "in4"]
    assert batch.column("tags").to_pylist() == [[], [], []]  # a NULL list rejects a batch
    assert str(batch.column("timestamp")[0]) == "2026-11-25 10:00:00.000001+00:00"


def test_a_second_handler_asking_another_sink_for_the_same_table_is_told(
    emulator, bq_client, table_name, tmp_path, caplog
) -> None:
    first = BigQueryAuditHandler(client=bq_client, table=table_name, spool_dir=str(tmp_path))
    second = BigQueryAuditHandler(client=bq_client, table=table_name, sink="write_api",
                                  write_api_host=emulator.grpc_target)  # fmt: skip
    assert second._writer is first._writer
    assert "sink='write_api' (is 'insert_all')" in caplog.text
    first.close()
