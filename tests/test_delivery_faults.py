"""Every delivery promise against a real fault, with the accounting rule asserted: HTTP
5xx/429/403 from a real socket, a spool disk that fills up or turns read-only, a spool
record that is not a row, no credentials, SIGTERM with BigQuery down and another handler
installed, writer processes killed, processes sharing one spool, and each option that
bounds or switches delivery."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.runnables import RunnableLambda

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.spool import Spool, read_segment

from .conftest import accounted, assert_accounted, count, delivered, remount, wait_for
from .proxy import FaultProxy

DATASET = "language_model_logging"


def through(proxy: FaultProxy) -> Any:
    from langchain_bq_audit.client import make_client

    return make_client(AuditSettings(emulator_host=proxy.host_port, project=proxy.project))


def calls(handler: BigQueryAuditHandler, n: int, tag: str = "u", text: str = "q") -> None:
    model = FakeListChatModel(responses=["ok"])
    for i in range(n):
        model.invoke(text, config={"callbacks": [handler], "metadata": {"user_id": f"{tag}{i}"}})


def bq_audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "langchain_bq_audit", *args],
                          capture_output=True, text=True, timeout=180, env=env)  # fmt: skip


def flowing(proxy: FaultProxy, table: str, spool: Path, **options: Any) -> BigQueryAuditHandler:
    """A handler writing through `proxy`, once its table exists and rows flow."""
    handler = BigQueryAuditHandler(client=through(proxy), table=table, batch_age_s=0.05,
                                   spool_dir=str(spool), **options)  # fmt: skip
    calls(handler, 5, "before")
    assert handler.flush(60)
    return handler


@pytest.mark.parametrize("status", [503, 429])
def test_5xx_and_429_are_retried_until_bigquery_answers(
    proxy, bq_client, table_name, tmp_path, status
) -> None:
    handler = flowing(proxy, table_name, tmp_path, batch_deadline_s=120)
    proxy.set_mode("http", status)
    calls(handler, 10)
    wait_for(lambda: proxy.answered >= 3, 60, f"three {status} answers")
    proxy.set_mode("pass")
    assert handler.flush(120)
    stats = accounted(handler)
    assert (stats["written"], stats["spooled"], stats["dead_lettered"]) == (15, 0, 0)
    assert stats["retried"] >= 10 * 3 - 10  # each answered request retried its 10 rows
    assert count(bq_client, table_name) == 15
    handler.close()


def test_permission_denied_is_not_retried_as_an_outage_and_loses_nothing(
    proxy, bq_client, table_name, tmp_path, caplog
) -> None:
    handler = flowing(proxy, table_name, tmp_path, batch_deadline_s=300)
    proxy.set_mode("http", 403)
    with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
        calls(handler, 10)
        assert handler.flush(120) is False  # within the flush, not after a 300 s deadline
    stats = accounted(handler)
    assert (stats["spooled"], stats["dead_lettered"]) == (10, 0)
    # one 403 and no retry (a pooled connection cut by the switch may be retried once)
    assert proxy.answered == 1 and stats["bigquery_down"] is True
    assert "permission denied" in caplog.text and "IAM roles" in caplog.text
    proxy.set_mode("pass")  # the operator grants the role: the next probe replays
    wait_for(lambda: handler.stats()["replayed"] == 10, 90, "the spool to be replayed")
    assert count(bq_client, table_name) == 15
    handler.close()


def test_a_spool_disk_that_fills_up_during_an_outage_counts_every_row(
    proxy, bq_client, table_name, tmpfs
) -> None:
    spool_root = tmpfs(1024 * 1024)
    (spool_root / "filler").write_bytes(b"\0" * 600_000)  # someone else's file
    handler = BigQueryAuditHandler(
        client=through(proxy), table=table_name, spool_dir=str(spool_root),
        batch_age_s=0.05, batch_deadline_s=0.5, batch_rows=20,
    )  # fmt: skip
    calls(handler, 5, "up")
    delivered(handler, 5)  # its 0.5 s deadline can spool them on a loaded machine
    proxy.set_mode("reset")
    calls(handler, 300, "down", text="x" * 3000)  # ~1.2 MB of rows: the disk fills
    stats = accounted(handler, 120)
    assert stats["dropped"] > 0 and stats["spooled"] > 0, stats
    assert "spool" in (stats["last_error"] or "")
    (spool_root / "filler").unlink()  # the operator frees space
    calls(handler, 20, "after")  # BigQuery still down: these fit now
    stats = accounted(handler, 120)
    proxy.set_mode("pass")
    wait_for(lambda: handler.stats()["replayed"] == stats["spooled"], 120, "the replay")
    stats = accounted(handler)
    assert stats["corrupt_spool_records"] == 0  # no torn record, none swallowed
    assert stats["accepted"] == 325
    # exactly the rows not counted dropped are in the table
    assert count(bq_client, table_name) == stats["written"] + stats["spooled"]
    assert count(bq_client, table_name) == 325 - stats["dropped"]
    handler.close()


def test_a_read_only_spool_is_replayed_once_not_forever(
    emulator, bq_client, table_name, tmpfs, caplog
) -> None:
    spool_root = tmpfs(4 * 1024 * 1024)
    closed = BigQueryAuditHandler(emulator_host=f"127.0.0.1:{_free_port()}",
                                  project=bq_client.project, table=table_name,
                                  spool_dir=str(spool_root), batch_deadline_s=0.3)  # fmt: skip
    calls(closed, 40)
    closed.close(timeout=10)
    assert closed.stats()["spooled"] == 40
    remount(spool_root, "ro")
    with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
        handler = BigQueryAuditHandler(client=bq_client, table=table_name,
                                       spool_dir=str(spool_root))  # fmt: skip
        handler._writer.ensure_started()
        wait_for(lambda: handler.stats()["replayed"] == 40, 60, "the replay")
        time.sleep(3)  # it was sent ~190 times a second before
    stats = handler.stats()
    assert stats["replayed"] == 40 and stats["spool_bytes"] == 0
    assert "cannot be removed" in caplog.text and caplog.text.count("cannot be removed") == 1
    assert count(bq_client, table_name, dedup=False) == 40
    handler.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_spool_record_that_is_not_a_row_does_not_stop_delivery(
    emulator, bq_client, table_name, tmp_path
) -> None:
    spool = Spool(tmp_path, f"{bq_client.project}.{DATASET}.{table_name}", max_bytes=10**6)
    spool.append([{"note": "written by hand, no event_id"}])
    spool.seal()
    handler = BigQueryAuditHandler(client=bq_client, table=table_name, spool_dir=str(tmp_path),
                                   batch_age_s=0.05)  # fmt: skip
    calls(handler, 5)
    assert handler.flush(60)
    stats = accounted(handler)
    assert (stats["written"], stats["spooled"], stats["bigquery_down"]) == (5, 0, False)
    assert stats["replay_dead_lettered"] == 1
    (dead,) = handler._writer.spool.dead_letters()
    assert read_segment(dead).records[0]["row"] == {"note": "written by hand, no event_id"}
    assert count(bq_client, table_name) == 5
    handler.close()


def test_no_credentials_is_said_at_once_and_the_rows_are_found_by_stats_and_replay(
    emulator, bq_client, table_name, tmp_path
) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GOOGLE_", "BIGQUERY_", "CLOUDSDK_", "GCLOUD_"))}  # fmt: skip
    env.update(HOME=str(tmp_path / "home"), BQ_AUDIT_SPOOL_DIR=str(tmp_path / "spool"),
               BQ_AUDIT_TABLE=table_name)  # fmt: skip
    script = textwrap.dedent("""
        import time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        handler = BigQueryAuditHandler(batch_age_s=0.1, batch_deadline_s=120)
        for i in range(3):
            FakeListChatModel(responses=["x"]).invoke("q", config={"callbacks": [handler]})
        started = time.monotonic()
        handler.flush(60)
        print("flushed-after", round(time.monotonic() - started, 1), handler.stats()["spooled"])
    """)
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=180)  # fmt: skip
    assert child.returncode == 0, child.stderr
    _, took, spooled = child.stdout.split()
    assert spooled == "3" and float(took) < 60  # not retried for the 120 s batch deadline
    assert "no usable Google Cloud credentials" in child.stderr
    assert "GOOGLE_APPLICATION_CREDENTIALS" in child.stderr  # the hint
    assert child.stderr.count("langchain-bq-audit") == 1, child.stderr  # one warning
    cli_env = {**env, "BIGQUERY_EMULATOR_HOST": emulator.host_port}
    stats = bq_audit("stats", "--json", "--table", table_name, env=cli_env)
    assert stats.returncode == 0, stats.stderr
    spools = json.loads(stats.stdout)["spools"]
    assert [(s["destination"], s["spooled_rows"]) for s in spools if s["spooled_rows"]] == [
        (f"default.{DATASET}.{table_name}", 3)
    ]
    replay = bq_audit("replay", "--all", env=cli_env)
    assert replay.returncode == 0, replay.stderr
    assert "replayed 3 rows" in replay.stdout
    assert count(bq_client, table_name) == 3


SIGTERM_APP = """
import json, signal, sys, time
from langchain_core.language_models.fake_chat_models import FakeListChatModel
def app_handler(signum, frame):
    print("app-handler-ran", flush=True)
    sys.exit(7)
if sys.argv[2] == "app-first":
    signal.signal(signal.SIGTERM, app_handler)
from langchain_bq_audit import BigQueryAuditHandler
handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
model = FakeListChatModel(responses=["x"])
for i in range(20):
    model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": str(i)}})
print("sigterm-is-ours", signal.getsignal(signal.SIGTERM) is not app_handler
      and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, flush=True)
time.sleep(60)
"""


def _app(options: dict[str, Any], mode: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SIGTERM_APP, json.dumps(options), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def test_sigterm_with_bigquery_hung_spools_then_runs_the_apps_own_handler(
    proxy, table_name, tmp_path
) -> None:
    proxy.set_mode("stall")
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": proxy.host_port}
    options = {"table": table_name, "spool_dir": str(tmp_path), "batch_age_s": 3600,
               "shutdown_timeout_s": 2.0, "request_timeout_s": 60.0}  # fmt: skip
    app = _app(options, "app-first", env)
    assert app.stdout is not None
    assert app.stdout.readline().split() == ["sigterm-is-ours", "True"]
    app.send_signal(signal.SIGTERM)
    out, err = app.communicate(timeout=90)
    assert "app-handler-ran" in out, err  # the app's own handler, after our drain
    assert app.returncode == 7
    spooled = [r for seg in tmp_path.rglob("*.seg") for r in read_segment(seg).records]
    assert sorted(int(r["user_id"]) for r in spooled) == list(range(20))


def test_handle_sigterm_false_leaves_sigterm_to_the_app(emulator, table_name, tmp_path) -> None:
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": emulator.host_port}
    options = {"table": table_name, "spool_dir": str(tmp_path), "handle_sigterm": False}
    app = _app(options, "no-app-handler", env)
    assert app.stdout is not None
    assert app.stdout.readline().split() == ["sigterm-is-ours", "False"]
    app.send_signal(signal.SIGTERM)
    app.wait(60)
    assert app.returncode == -signal.SIGTERM


def test_two_processes_sharing_a_spool_count_each_row_written_once(
    emulator, bq_client, table_name, tmp_path
) -> None:
    spool = tmp_path / "spool"
    closed = BigQueryAuditHandler(emulator_host=f"127.0.0.1:{_free_port()}",
                                  project=bq_client.project, table=table_name, spool_dir=str(spool),
                                  batch_deadline_s=0.3, batch_rows=100)  # fmt: skip
    calls(closed, 600, "spooled")
    closed.close(timeout=30)
    assert closed.stats()["spooled"] == 600
    script = textwrap.dedent("""
        import json, sys
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
        model = FakeListChatModel(responses=["x"])
        for i in range(500):
            meta = {"user_id": f"{sys.argv[2]}-{i}"}
            model.invoke("q", config={"callbacks": [handler], "metadata": meta})
        handler.flush(120)
        while handler.stats()["spool_bytes"]:
            handler.flush(1)
        print(json.dumps(handler.stats()))
    """)
    options = json.dumps({"table": table_name, "spool_dir": str(spool), "batch_age_s": 0.05})
    env = {**os.environ, "BIGQUERY_EMULATOR_HOST": emulator.host_port}
    procs = [subprocess.Popen([sys.executable, "-c", script, options, tag], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    for stats in results:
        assert_accounted(stats)
        assert stats["written"] == stats["accepted"] == 500
    assert sum(s["replayed"] for s in results) == 600  # each spooled row replayed once
    assert count(bq_client, table_name) == 1600


def test_writer_processes_killed_three_times_keep_the_accounts(
    emulator, bq_client, table_name, tmp_path
) -> None:
    handler = BigQueryAuditHandler(client=None, emulator_host=emulator.host_port,
                                   project=bq_client.project, table=table_name, writer_process=True,
                                   spool_dir=str(tmp_path), batch_age_s=0.2)  # fmt: skip
    killed = []
    for round_ in range(4):
        calls(handler, 500, f"r{round_}-")
        if round_ < 3:
            wait_for(lambda: handler.stats()["handed_over"] > 0, 60, "a writer process")
            pid = handler.stats()["writer_process"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            wait_for(lambda p=pid: handler.stats()["writer_process"] != p, 60, "a new one")
    assert handler.flush(120)
    stats = accounted(handler, 120)
    assert stats["accepted"] == 2000
    assert (
        "writer process ended with code -9" in (stats["last_error"] or "") or stats["dropped"] == 0
    )
    # rows counted dropped died with a writer process, though some may have been written
    # just before it died: never fewer rows than counted written, never more than sent
    in_table = count(bq_client, table_name)
    assert stats["written"] <= in_table <= stats["written"] + stats["dropped"]
    handler.close()


def test_auto_create_off_keeps_rows_until_the_table_exists(
    emulator, bq_client, table_name, tmp_path, caplog
) -> None:
    with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
        handler = BigQueryAuditHandler(client=bq_client, table=table_name, auto_create=False,
                                       spool_dir=str(tmp_path), batch_age_s=0.05,
                                       batch_deadline_s=3)  # fmt: skip
        calls(handler, 5)
        assert handler.flush(120) is False
    stats = accounted(handler)
    assert (stats["spooled"], stats["written"]) == (5, 0)
    assert "auto_create is off" in caplog.text
    # a busy emulator may take over init's default 30 s a request
    init = bq_audit("init", "--table", table_name, "--endpoint", emulator.host_port,
                    "--timeout", "120")  # fmt: skip
    assert init.returncode == 0, init.stderr
    wait_for(lambda: handler.stats()["replayed"] == 5, 120, "the replay once the table exists")
    assert count(bq_client, table_name) == 5
    handler.close()


def test_hash_chain_off_writes_rows_without_chain_columns(make_handler, read_rows) -> None:
    handler = make_handler(hash_chain=False)
    calls(handler, 3)
    assert handler.flush(60)
    rows = read_rows()
    assert len(rows) == 3
    assert all(r["chain_id"] is None and r["row_hash"] is None for r in rows)


def test_max_row_bytes_cuts_the_largest_texts_until_the_row_fits(make_handler, read_rows) -> None:
    handler = make_handler(max_row_bytes=60_000)
    RunnableLambda(lambda x: "y" * 50_000).invoke("x" * 80_000, config={"callbacks": [handler]})
    assert handler.flush(60)
    (row,) = read_rows()
    assert row["is_truncated"] is True
    assert len(row["input_text"]) + len(row["output_text"]) <= 60_000
    assert row["input_text"].startswith("xxxx") and row["output_text"].startswith("yyyy")
