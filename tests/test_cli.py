"""`bq-audit` as a user runs it: each command as a subprocess against the local BigQuery."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda

from langchain_bq_audit import BigQueryAuditHandler, views
from langchain_bq_audit.cli import build_parser

from .conftest import TRACE, count, query, remount, run_traced_chain, wait_for
from .proxy import FaultProxy

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def bq_audit(*args: str, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([sys.executable, "-m", "langchain_bq_audit", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip


def write_rows(handler: BigQueryAuditHandler) -> None:
    def model(i: int) -> Any:
        usage = {"input_tokens": 10 * i, "output_tokens": 1, "total_tokens": 10 * i + 1}
        return GenericFakeChatModel(messages=iter([AIMessage(f"answer {i}", usage_metadata=usage)]))

    for i, (session, user) in enumerate([("s-a", "ana"), ("s-a", "ana"), ("s-b", "bob")], 1):
        meta = {"session_id": session, "user_id": user}
        model(i).invoke(f"question {i}", config={"callbacks": [handler], "metadata": meta})
    with pytest.raises(ValueError):
        RunnableLambda(lambda _: (_ for _ in ()).throw(ValueError("nope"))).invoke(
            "bad", config={"callbacks": [handler], "metadata": {"session_id": "s-b"}}
        )
    assert handler.flush(timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    proc = bq_audit(command, "--help")
    assert proc.returncode == 0
    example = proc.stdout.split("example:\n", 1)[1]
    assert "bq-audit " + command in example


def test_tail_shows_the_latest_rows_readable_filtered_and_as_json(
    emulator, bq_client, make_handler, table_name
) -> None:
    write_rows(make_handler())
    where = ("--endpoint", emulator.host_port, "--table", table_name)

    proc = bq_audit("tail", "-n", "3", *where)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert "'user: question 2' -> 'answer 2'" in lines[0]
    assert "s-b" in lines[2] and "error:ValueError" in lines[2]  # the newest, last
    assert "21 tok" in proc.stdout.splitlines()[0]

    ana = bq_audit("tail", "--user", "ana", *where).stdout.splitlines()
    assert len(ana) == 2 and all("ana" in line for line in ana)

    rows = [json.loads(line) for line in bq_audit("tail", "--json", "--session", "s-b",
                                                  *where).stdout.splitlines()]  # fmt: skip
    assert [(r["run_type"], r["status"]) for r in rows] == [("chat_model", "ok"),
                                                           ("chain", "error")]  # fmt: skip
    assert rows[0]["total_tokens"] == 31 and rows[0]["output_text"] == "answer 3"

    # a row written twice (a retry after a lost answer, a replay) shows once
    full = f"{bq_client.project}.language_model_logging.{table_name}"
    query(bq_client, f"INSERT INTO `{full}` SELECT * FROM `{full}` WHERE session_id = 's-b'")
    assert len(query(bq_client, f"SELECT 1 FROM `{full}` WHERE session_id = 's-b'")) == 4
    again = bq_audit("tail", "--json", "--session", "s-b", *where).stdout.splitlines()
    assert [json.loads(line)["event_id"] for line in again] == [r["event_id"] for r in rows]


def follow(emulator: Any, table: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """`bq-audit tail -f` on `table`, and a queue of the lines it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "langchain_bq_audit", "tail", "-f", "-n", "1", "--interval",
         "0.3", "--endpoint", emulator.host_port, "--table", table],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc, lines


def test_tail_follow_prints_new_rows_as_they_arrive(emulator, make_handler, table_name) -> None:
    handler = make_handler()
    write_rows(handler)
    proc, lines = follow(emulator, table_name)
    try:
        assert "error:ValueError" in lines.get(timeout=120)
        GenericFakeChatModel(messages=iter([AIMessage("late answer")])).invoke(
            "late question", config={"callbacks": [handler]}
        )
        assert handler.flush(timeout=60)
        assert "'user: late question' -> 'late answer'" in lines.get(timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tail_follow_shows_a_row_written_after_rows_that_ended_later(
    emulator, make_handler, table_name
) -> None:
    fast = make_handler()
    write_rows(fast)
    # another writer (its own client), holding its rows for a while, as another process would
    slow = BigQueryAuditHandler(client=emulator.client(), table=table_name, batch_age_s=60)
    proc, lines = follow(emulator, table_name)
    try:
        assert "error:ValueError" in lines.get(timeout=120)
        model = GenericFakeChatModel
        model(messages=iter([AIMessage("ended first")])).invoke("a", config={"callbacks": [slow]})
        model(messages=iter([AIMessage("ended second")])).invoke("b", config={"callbacks": [fast]})
        assert fast.flush(timeout=60)
        assert "'user: b' -> 'ended second'" in lines.get(timeout=120)
        assert slow.flush(timeout=60)  # written now, with an end time before the newest shown
        assert "'user: a' -> 'ended first'" in lines.get(timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.usefixtures("writer_makes_views")
def test_stats_summarizes_the_table_and_the_local_spool(
    emulator, bq_client, make_handler, table_name, tmp_path
) -> None:
    write_rows(make_handler())
    spool = tmp_path / "spool"
    dead = FaultProxy(1)
    dead.set_mode("reset")
    stranded = BigQueryAuditHandler(table=table_name, emulator_host=dead.host_port,
                                    project=bq_client.project, spool_dir=str(spool),
                                    batch_age_s=0.01, batch_deadline_s=0.2)  # fmt: skip
    try:
        GenericFakeChatModel(messages=iter([AIMessage("x")])).invoke(
            "q", config={"callbacks": [stranded]}
        )
        assert stranded.flush(timeout=10) is False
    finally:
        stranded.close(timeout=1)
        dead.close()

    where = ("--endpoint", emulator.host_port, "--table", table_name, "--spool-dir", str(spool))
    stats = json.loads(bq_audit("stats", "--json", *where).stdout)
    assert (stats["rows"], stats["sessions"], stats["users"]) == (4, 2, 2)
    assert (stats["model_calls"], stats["total_tokens"], stats["errors"]) == (3, 63, 1)
    newest = query(bq_client, f"SELECT MAX(timestamp) AS t FROM `{bq_client.project}."
                              f"language_model_logging.{table_name}`")[0]["t"]  # fmt: skip
    assert stats["newest_run_end"] == str(newest)
    assert (stats["spooled_rows"], stats["dead_letter_rows"]) == (1, 0)
    human = bq_audit("stats", *where)
    assert human.returncode == 0, human.stderr
    assert "4 rows, 2 sessions, 2 users, 3 model calls, 63 tokens, 1 errors" in human.stdout
    # no model here has a price: the cost is unknown, never $0
    assert (stats["cost_usd"], stats["unpriced_calls"]) == (None, 3)
    assert "cost: - (3 unpriced) in all; - (3 unpriced) over 3 model calls in the last 24 h" in (
        human.stdout.splitlines()
    )
    assert "1 rows in 1 segment(s) waiting for replay" in human.stdout
    assert "hint: bq-audit replay" in human.stdout


def one_clear_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bq-audit: ") and "hint:" in line
    return line


def test_errors_a_new_user_meets_are_one_line_with_a_hint(
    emulator, bq_client, tmp_path: Path
) -> None:
    configured = ("BIGQUERY_", "GOOGLE_", "BQ_AUDIT_PROJECT", "CLOUDSDK")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(configured)}
    clean["HOME"] = str(tmp_path)  # no gcloud credentials file either
    no_credentials = one_clear_line(bq_audit("tail", env=clean))
    assert "no Google Cloud credentials" in no_credentials and "bq-audit emulator" in no_credentials

    bq_client.create_dataset(f"{bq_client.project}.language_model_logging", exists_ok=True)
    missing = one_clear_line(bq_audit("tail", "--endpoint", emulator.host_port,
                                      "--table", "no_such_table"))  # fmt: skip
    assert "no_such_table" in missing and "bq-audit init" in missing

    unreachable = one_clear_line(bq_audit("stats", "--endpoint", "127.0.0.1:9"))
    assert "cannot reach BigQuery" in unreachable


def test_trace_prints_the_run_tree_of_one_trace(emulator, bq_client, make_handler,
                                                table_name) -> None:  # fmt: skip
    run_traced_chain(make_handler())
    where = ("--endpoint", emulator.host_port, "--table", table_name)
    full = f"{bq_client.project}.language_model_logging.{table_name}"
    # a retry or replay writes rows twice: the trace shows each run once
    query(bq_client, f"INSERT INTO `{full}` SELECT * FROM `{full}` WHERE trace_id = @t", t=TRACE)

    proc = bq_audit("trace", TRACE, *where)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in query(bq_client, f"SELECT * FROM `{full}` WHERE trace_id = @t",
                                        t=TRACE)}  # fmt: skip
    assert len(rows) == 5

    def ms(name: str) -> str:  # latency is the one value no test can fix: the table's own
        latency = rows[name]["latency_ms"]
        return f"{latency:.1f} ms" if latency < 10 else f"{latency:,.0f} ms"

    start = rows["RunnableSequence"]["start_time"]
    assert proc.stdout.splitlines() == [
        f"trace {TRACE}: 5 runs, 1 model call(s), 0 error(s), - tokens, cost - (1 unpriced); "
        f"session s-trace, user ana; started {start:%Y-%m-%d %H:%M:%S} UTC",
        "run                                 type        status              latency   tokens"
        "        cost  input -> output",
        f"RunnableSequence                    chain       ok                "
        f"{ms('RunnableSequence'):>9}        -           -  'cats' -> 'CATS PURR!'",
        f"  ChatPromptTemplate                chain       ok                "
        f"{ms('ChatPromptTemplate'):>9}        -           -  "
        "'cats' -> 'user: Tell me about cats'",
        f"  FakeListChatModel                 chat_model  ok                "
        f"{ms('FakeListChatModel'):>9}        -           -  "
        "'user: Tell me about cats' -> 'cats purr'",
        f"  StrOutputParser                   chain       ok                "
        f"{ms('StrOutputParser'):>9}        -           -  'cats purr' -> 'cats purr'",
        f"  shout                             tool        ok                "
        f"{ms('shout'):>9}        -           -  'cats purr' -> 'CATS PURR!'",
    ]  # fmt: skip
    # any run's id, or any row's event id, names the same trace
    model = rows["FakeListChatModel"]
    assert bq_audit("trace", model["run_id"], *where).stdout == proc.stdout
    assert bq_audit("trace", model["event_id"], *where).stdout == proc.stdout
    pasted = f"UUID('{model['run_id'].upper().replace('-', '')}')"  # as a log line shows it
    assert bq_audit("trace", pasted, *where).stdout == proc.stdout
    as_json = bq_audit("trace", TRACE, "--json", *where).stdout.splitlines()
    assert sorted(json.loads(x)["name"] for x in as_json) == sorted(rows)

    unknown = bq_audit("trace", "no-such-trace", *where)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.splitlines() == [
        f"bq-audit: no run in {full} has trace id, run id or event id 'no-such-trace'"
    ]


@pytest.mark.usefixtures("writer_makes_views")
def test_sessions_lists_the_latest_sessions_with_their_totals(
    emulator, bq_client, make_handler, table_name
) -> None:
    write_rows(make_handler())
    where = ("--endpoint", emulator.host_port, "--table", table_name)
    full = f"{bq_client.project}.language_model_logging.{table_name}"
    query(bq_client, f"INSERT INTO `{full}` SELECT * FROM `{full}`")  # every row twice

    proc = bq_audit("sessions", *where)
    assert proc.returncode == 0, proc.stderr
    times = {r["session_id"]: r for r in query(
        bq_client, f"SELECT session_id, MIN(start_time) AS first, MAX(timestamp) AS last "
        f"FROM `{full}` GROUP BY session_id")}  # fmt: skip

    def when(session: str) -> str:
        return "  ".join(f"{times[session][k]:%Y-%m-%d %H:%M:%S}" for k in ("first", "last"))

    assert proc.stdout.splitlines() == [
        "session               first run (UTC)      last run (UTC)        runs  calls    tokens"
        "            cost  errors  users",
        f"s-b                   {when('s-b')}      2      1        31  - (1 unpriced)       1  "
        "1: bob",
        f"s-a                   {when('s-a')}      2      2        32  - (2 unpriced)       0  "
        "1: ana",
    ]  # fmt: skip
    newest = bq_audit("sessions", "--limit", "1", "--json", *where).stdout.splitlines()
    assert [json.loads(x)["session_id"] for x in newest] == ["s-b"]
    # no model here has a price: the cost is unknown, not $0
    assert (json.loads(newest[0])["cost_usd"], json.loads(newest[0])["unpriced_calls"]) == (None, 1)
    later = bq_audit("sessions", "--since", "2999-01-01", *where)
    assert later.returncode == 0 and later.stdout == ""
    assert later.stderr.strip() == f"no sessions in {full} since 2999-01-01"
    bad = bq_audit("sessions", "--since", "yesterday", *where)
    assert bad.returncode == 2 and "--since wants a date" in bad.stderr
    none = bq_audit("sessions", "--limit", "0", *where)
    assert none.returncode == 2 and "--limit wants a number of sessions" in none.stderr


@pytest.mark.usefixtures("writer_makes_views")
def test_replay_onto_a_new_table_leaves_its_views(emulator, bq_client, table_name,
                                                  tmp_path) -> None:  # fmt: skip
    """Rows spooled in an outage, then `bq-audit replay` onto a table that did not exist
    yet: it makes the table, writes the rows and makes the views (`bq-audit sessions`
    reads one), as a writer does after its first rows; not a table without views."""
    spool = tmp_path / "spool"
    handler = BigQueryAuditHandler(table=table_name, emulator_host="127.0.0.1:9",
                                   spool_dir=str(spool), request_timeout_s=0.5,
                                   batch_deadline_s=0.5, batch_age_s=0.05)  # fmt: skip
    model = GenericFakeChatModel(messages=iter([AIMessage("a"), AIMessage("b")]))
    for session in ("s-1", "s-2"):
        model.invoke("q", config={"callbacks": [handler], "metadata": {"session_id": session}})
    assert handler.flush(timeout=30) is False
    # spooled once the batch deadline ran out: maybe after the flush gave up, when loaded
    wait_for(lambda: handler.stats()["spooled"] == 2, 60, "the rows to be spooled")
    handler.close(timeout=5)

    where = ("--endpoint", emulator.host_port, "--table", table_name)
    replay = bq_audit("replay", *where, "--spool-dir", str(spool))
    assert replay.returncode == 0, replay.stderr
    made = {
        t.table_id for t in bq_client.list_tables(f"{bq_client.project}.language_model_logging")
    }
    assert {f"{table_name}{suffix}" for suffix in views.VIEWS} <= made
    sessions = bq_audit("sessions", *where)
    assert sessions.returncode == 0, sessions.stderr


def test_replay_of_a_read_only_spool_says_its_segment_is_still_there(
    emulator, bq_client, table_name, tmpfs
) -> None:
    """The rows of a read-only spool are written, but the segment cannot be removed: the
    summary must not say `0 segment(s) left` while `bq-audit stats` still shows it."""
    spool = tmpfs(4 * 1024 * 1024)
    handler = BigQueryAuditHandler(table=table_name, emulator_host="127.0.0.1:9",
                                   spool_dir=str(spool), request_timeout_s=0.5,
                                   batch_deadline_s=0.5, batch_age_s=0.05)  # fmt: skip
    model = GenericFakeChatModel(messages=iter([AIMessage("a"), AIMessage("b")]))
    for _ in range(2):
        model.invoke("q", config={"callbacks": [handler]})
    wait_for(lambda: handler.stats()["spooled"] == 2, 60, "the rows to be spooled")
    handler.close(timeout=5)
    remount(spool, "ro")

    where = ("--endpoint", emulator.host_port, "--table", table_name)
    replay = bq_audit("replay", *where, "--spool-dir", str(spool))
    assert replay.returncode == 0, replay.stderr
    assert count(bq_client, table_name) == 2
    assert "replayed 2 rows" in replay.stdout
    assert "1 segment(s) left" in replay.stdout, replay.stdout
    assert "could not be removed" in replay.stdout
    stats = bq_audit("stats", *where, "--spool-dir", str(spool))
    assert "2 rows in 1 segment(s) waiting for replay" in stats.stdout, stats.stdout
