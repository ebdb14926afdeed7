"""Real faults and process lifecycle: a stopped emulator, process exit, env configuration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.emulator import LocalBigQuery
from langchain_bq_audit.spool import read_segment

from .conftest import query


def test_flush_returns_in_time_when_bigquery_is_gone(tmp_path) -> None:
    """Stop the emulator for real: the chain keeps working, flush keeps its timeout."""
    bq = LocalBigQuery(tmp_path / "bq").start(timeout=300)
    try:
        handler = BigQueryAuditHandler(
            client=bq.client(),
            table="gone",
            spool_dir=str(tmp_path / "spool"),  # not the session's: its rows are this test's
            batch_age_s=0.05,
            request_timeout_s=1.0,
            batch_deadline_s=30.0,
        )
        model = FakeListChatModel(responses=["before"])
        assert model.invoke("a", config={"callbacks": [handler]}).content == "before"
        assert handler.flush(timeout=60)
        assert handler.stats()["written"] == 1
    finally:
        bq.stop()

    model = FakeListChatModel(responses=["after"])
    for _ in range(20):  # the handler must not raise into the chain, nor slow it down much
        assert model.invoke("b", config={"callbacks": [handler]}).content == "after"

    started = time.monotonic()
    ok = handler.flush(timeout=1.5)
    elapsed = time.monotonic() - started
    assert ok is False
    # bounded by its timeout, not by the 30 s batch deadline (slack for a loaded machine)
    assert elapsed < 15, f"flush(timeout=1.5) took {elapsed:.2f} s"
    stats = handler.stats()
    assert stats["callback_errors"] == 0
    assert stats["written"] == 1
    assert stats["last_error"]  # the connection failure is visible

    closed = time.monotonic()
    handler.close(timeout=1.0)
    assert time.monotonic() - closed < 15


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_emulator_host_env_points_the_default_client(
    emulator, bq_client, monkeypatch, scheme: str
) -> None:
    table = f"envhost_{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", scheme + emulator.host_port)
    monkeypatch.setenv("BQ_AUDIT_PROJECT", emulator.project)
    monkeypatch.setenv("BQ_AUDIT_TABLE", table)
    handler = BigQueryAuditHandler(batch_age_s=0.05)
    assert handler.settings.table == table
    FakeListChatModel(responses=["via env"]).invoke("q", config={"callbacks": [handler]})
    assert handler.flush(timeout=120)  # the first write creates the table: slow when loaded
    handler.close()

    rows = query(
        bq_client, f"SELECT output_text FROM `{bq_client.project}.language_model_logging.{table}`"
    )
    assert rows == [{"output_text": "via env"}]


def _run_child(code: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_rows_are_written_at_exit_without_a_flush(emulator, bq_client) -> None:
    """The atexit drain writes what the app left queued (a long batch age keeps it queued)."""
    table = f"atexit_{uuid.uuid4().hex[:6]}"
    child = _run_child(
        """
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        # the drain's deadline is not the point here: a long one, for a loaded machine
        handler = BigQueryAuditHandler(batch_age_s=3600, shutdown_timeout_s=60)
        model = FakeListChatModel(responses=["bye"])
        for i in range(20):
            model.invoke("x", config={"callbacks": [handler], "metadata": {"user_id": str(i)}})
        print("queued", handler.stats()["queued"])
        """,
        {
            "BIGQUERY_EMULATOR_HOST": emulator.host_port,
            "BQ_AUDIT_PROJECT": emulator.project,
            "BQ_AUDIT_TABLE": table,
        },
    )
    assert child.returncode == 0, child.stderr
    assert "queued 20" in child.stdout
    rows = query(
        bq_client, f"SELECT user_id FROM `{bq_client.project}.language_model_logging.{table}`"
    )
    assert sorted(int(r["user_id"]) for r in rows) == list(range(20))


def test_exit_is_bounded_when_bigquery_is_unreachable(tmp_path) -> None:
    port = LocalBigQuery(tmp_path).port  # a free port nobody listens on
    # a spool of its own: in the session's, the row it leaves for the default table would be
    # replayed by the next process of this worker that writes there
    spool = tmp_path / "spool"
    child = _run_child(
        """
        import time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        handler = BigQueryAuditHandler(batch_age_s=3600, shutdown_timeout_s=2,
                                       batch_deadline_s=30)
        FakeListChatModel(responses=["x"]).invoke("x", config={"callbacks": [handler]})
        print("last-call", time.time(), flush=True)
        """,
        {"BIGQUERY_EMULATOR_HOST": f"127.0.0.1:{port}", "BQ_AUDIT_SPOOL_DIR": str(spool)},
    )
    exited = time.time()
    assert child.returncode == 0, child.stderr
    # from the last call, not from the start: interpreter start-up is not the point, and a
    # loaded machine stretches it. The 2 s drain plus teardown stays far below the 30 s of
    # retries an unbounded exit would wait for.
    elapsed = exited - float(child.stdout.split()[1])
    assert elapsed < 25, f"exit took {elapsed:.1f} s after the last call"
    # and the row is not lost: spooled for the next process
    (spooled,) = [r for seg in spool.rglob("*.seg") for r in read_segment(seg).records]
    assert spooled["output_text"] == "x"


def test_demo_command_against_a_running_emulator(emulator) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "demo", "--endpoint", emulator.host_port],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6 calls by 2 users in 3 sessions -> 23 rows" in out
    assert "error recorded: ConnectionError: model provider unavailable" in out
    assert "model calls: 6" in out
    assert "rows with errors: 2" in out
    for who in ("alice", "bob", "s-alice-1", "s-alice-2", "s-bob-1"):
        assert who in out


def test_demo_command_starts_its_own_emulator(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "demo", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "local BigQuery ready on http://127.0.0.1:" in proc.stdout
    assert "-> 23 rows" in proc.stdout


def test_demo_command_explains_an_emulator_that_cannot_start(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    proc = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "demo", "--data-dir", str(blocker)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("bq-audit: ")
    assert "Traceback" not in proc.stderr


def _settings_errors(env: dict[str, str], **kwargs: Any) -> str:
    try:
        BigQueryAuditHandler(**kwargs)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return ""


def test_bad_configuration_gets_a_clear_error(monkeypatch) -> None:
    assert "unknown audit setting(s): batch_size" in _settings_errors({}, batch_size=3)
    assert "table must be letters" in _settings_errors({}, table="my-table; drop")
    monkeypatch.setenv("BQ_AUDIT_BATCH_ROWS", "many")
    assert "BQ_AUDIT_BATCH_ROWS='many' is not valid" in _settings_errors({})
    monkeypatch.setenv("BQ_AUDIT_BATCH_ROWS", "0")
    assert "batch_rows must be at least 1" in _settings_errors({})


def test_sigterm_while_the_app_is_inside_a_flush_is_drained_not_hung(emulator, bq_client) -> None:
    """The SIGTERM drain runs in the main thread, between two of its bytecodes: here while
    the app's flush is inside the writer's wake-up (`threading.Event.set`, which holds the
    event's lock; a loop of `flush` calls meets this about one SIGTERM in five). The drain
    must not wait for that lock: the rows are written and the process dies of SIGTERM."""
    table = f"sigterm_flush_{uuid.uuid4().hex[:6]}"
    code = """
        import os, signal, time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler
        handler = BigQueryAuditHandler(batch_age_s=3600, shutdown_timeout_s=20)
        FakeListChatModel(responses=["bye"]).invoke("x", config={"callbacks": [handler]})
        wake = handler._writer._wake
        with wake._cond:  # where Event.set is when the signal is handled
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        """
    env = {"BIGQUERY_EMULATOR_HOST": emulator.host_port, "BQ_AUDIT_PROJECT": emulator.project,
           "BQ_AUDIT_TABLE": table}  # fmt: skip
    try:
        child = _run_child(code, env, timeout=120)  # a hang is for good; start-up is slow
    except subprocess.TimeoutExpired:
        pytest.fail("the SIGTERM drain hung on the lock the interrupted flush holds")
    assert child.returncode == -signal.SIGTERM, child.stderr
    rows = query(
        bq_client, f"SELECT name FROM `{bq_client.project}.language_model_logging.{table}`"
    )
    assert [r["name"] for r in rows] == ["FakeListChatModel"]


def test_each_sigterm_reaches_the_apps_own_handler_after_a_drain(emulator, bq_client) -> None:
    """An app whose own SIGTERM handler keeps it running (a server's graceful shutdown
    counts them): every SIGTERM still reaches that handler, one that comes while the drain
    of the one before runs too, and each drains what was queued by then."""
    table = f"sigterm_app_{uuid.uuid4().hex[:6]}"
    code = """
        import os, signal, time
        from langchain_core.language_models.fake_chat_models import FakeListChatModel
        from langchain_bq_audit import BigQueryAuditHandler, registry
        got = []
        signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
        handler = BigQueryAuditHandler(batch_age_s=3600, shutdown_timeout_s=20)
        model = FakeListChatModel(responses=["one", "two"])

        def wait(n):
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(got) == n, got

        model.invoke("x", config={"callbacks": [handler]})
        os.kill(os.getpid(), signal.SIGTERM)
        assert registry._sigterm_drain is not None  # the first drain runs
        os.kill(os.getpid(), signal.SIGTERM)  # a second while it runs
        wait(2)
        model.invoke("y", config={"callbacks": [handler]})
        os.kill(os.getpid(), signal.SIGTERM)  # the process went on: a third drains again
        wait(3)
        print("went on")
        """
    env = {"BIGQUERY_EMULATOR_HOST": emulator.host_port, "BQ_AUDIT_PROJECT": emulator.project,
           "BQ_AUDIT_TABLE": table}  # fmt: skip
    child = _run_child(code, env, timeout=120)
    assert child.returncode == 0, child.stderr
    assert "went on" in child.stdout
    rows = query(
        bq_client, f"SELECT output_text FROM `{bq_client.project}.language_model_logging.{table}`"
    )
    assert sorted(r["output_text"] for r in rows) == ["one", "two"]
