"""`writer_process=True`: rows built and sent by a child process, under real faults."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.integrity import verify
from langchain_bq_audit.writer import Writer

from .conftest import assert_accounted, query, wait_for

DATASET = "language_model_logging"


def rows_of(bq_client: Any, table: str, view: str = "") -> list[dict[str, Any]]:
    return query(
        bq_client, f"SELECT * FROM `{bq_client.project}.{DATASET}.{table}{view}` ORDER BY seq"
    )


def count(bq_client: Any, table: str, view: str = "") -> int:
    return query(
        bq_client, f"SELECT COUNT(*) AS n FROM `{bq_client.project}.{DATASET}.{table}{view}`"
    )[0]["n"]


def process_handler(emulator: Any, table: str, **options: Any) -> BigQueryAuditHandler:
    return BigQueryAuditHandler(
        table=table, emulator_host=emulator.endpoint, project=emulator.project,
        writer_process=True, **options,
    )  # fmt: skip


def handler_and_chain(
    emulator: Any, table: str, **options: Any
) -> tuple[BigQueryAuditHandler, Any]:
    """A handler of `table` on the emulator, and a quick chain (prompt | fake chat model |
    parser: four rows a call)."""
    handler = BigQueryAuditHandler(table=table, emulator_host=emulator.endpoint,
                                   project=emulator.project, **options)  # fmt: skip
    chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
             | FakeListChatModel(responses=["ok"]) | StrOutputParser())  # fmt: skip
    return handler, chain


def replay_spool(emulator: Any, table: str) -> None:
    """`bq-audit replay` of the test's spool folder, in a process of its own."""
    replay = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "replay", "--table", table,
         "--endpoint", emulator.host_port, "--project", emulator.project,
         "--spool-dir", os.environ["BQ_AUDIT_SPOOL_DIR"]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended


def test_rows_from_the_writer_process_equal_rows_from_the_writer_thread(
    emulator, bq_client, table_name, tmp_path
) -> None:
    class Unpicklable:  # a local class: pickle cannot name it, so its run crosses as a row
        def __repr__(self) -> str:
            return "Unpicklable()"

    class LookupFailed(Exception):
        pass

    def fail(_: Any) -> str:
        raise LookupFailed("no such order")

    chain = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])
    chain = chain | FakeListChatModel(responses=["ünïcode ✓ answer"]) | StrOutputParser()
    tables = {"thread": f"{table_name}_th", "process": f"{table_name}_pr"}
    for mode, table in tables.items():
        options = {"spool_dir": str(tmp_path / mode), "session_id": "s-1", "batch_age_s": 0.1}
        if mode == "thread":
            handler = BigQueryAuditHandler(client=bq_client, table=table, **options)
        else:
            handler = process_handler(emulator, table, **options)
        config: Any = {"callbacks": [handler], "tags": ["t1"]}
        for i in range(30):
            config["metadata"] = {"user_id": f"u{i}"}
            chain.invoke({"q": f"question {i}"}, config=config)
        RunnableLambda(lambda x: "kept").invoke({"thing": Unpicklable()}, config=config)
        with pytest.raises(LookupFailed):
            RunnableLambda(fail).invoke("o-1", config=config)
        assert handler.flush(timeout=60), handler.stats()
        stats = handler.stats()
        if mode == "process":
            assert stats["writer_process"] not in (None, os.getpid())
        assert stats["written"] == 122 and stats["dropped"] == 0, stats
        handler.close()

    by_mode = {mode: rows_of(bq_client, table) for mode, table in tables.items()}
    report = verify(by_mode["process"])  # chained in the child: every row in one chain
    assert report.ok, report.findings
    assert list(report.rows.values()) == [122]

    def comparable(row: dict[str, Any]) -> tuple[Any, ...]:
        varying = {"event_id", "run_id", "parent_run_id", "trace_id", "timestamp", "start_time",
                   "latency_ms", "chain_id", "prev_hash", "row_hash", "output_messages",
                   "metadata", "seq"}  # fmt: skip
        return tuple(sorted((k, repr(v)) for k, v in row.items() if k not in varying))

    assert sorted(map(comparable, by_mode["process"])) == sorted(map(comparable, by_mode["thread"]))
    rows = by_mode["process"]
    kept = [r for r in rows if r["name"] == "RunnableLambda" and r["status"] == "ok"]
    assert [r["input_text"] for r in kept] == ['{"thing":"Unpicklable()"}']
    failed = [r for r in rows if r["status"] == "error"]
    assert [(r["error_type"], r["error_message"]) for r in failed] == [
        ("LookupFailed", "no such order")
    ]


SCRIPT = """
import json, os, signal, sys, time
from dataclasses import dataclass
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.runnables import RunnableLambda
from langchain_bq_audit import BigQueryAuditHandler

@dataclass
class Order:  # a class of __main__: the writer process cannot import it
    item: str
    qty: int

class Plain:
    def __repr__(self):
        return "Plain()"

options = json.loads(sys.argv[1])
handler = BigQueryAuditHandler(**options)
model = FakeListChatModel(responses=["x"])
for i in range(30):
    model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": f"u{i}"}})
RunnableLambda(lambda x: x["order"].qty).invoke(
    {"order": Order("tea", 2), "plain": Plain()}, config={"callbacks": [handler]})
deadline = time.monotonic() + 60
stats = handler.stats()  # asked behind every run
# read by the writer process (with the writer thread, every accepted run is with the writer)
held = lambda: stats.get("handed_over", stats["accepted"])
while held() < 31 and time.monotonic() < deadline:
    time.sleep(0.05)
    stats = handler.stats()
print("held", held(), stats["written"], stats["writer_process"], flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)
"""


def run_script(emulator: Any, table: str, mode: str, **options: Any) -> subprocess.Popen[str]:
    # the exit drain's deadline is not the point of these scripts: a long one, for a loaded
    # machine (its first write also creates the table)
    options = {"table": table, "project": emulator.project, "emulator_host": emulator.endpoint,
               "shutdown_timeout_s": 60, **options}  # fmt: skip
    import json

    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(options), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_objects_of_classes_from_main_are_rendered_as_in_process(
    emulator, bq_client, table_name
) -> None:
    inputs = {}
    for process in (False, True):
        table = f"{table_name}_{int(process)}"
        child = run_script(emulator, table, "exit", writer_process=process)
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert "Traceback" not in err and "rows built in-process" not in err, err
        rows = query(bq_client, f"SELECT input_text FROM `{bq_client.project}.{DATASET}.{table}` "
                                "WHERE name = 'RunnableLambda'")  # fmt: skip
        inputs[process] = [r["input_text"] for r in rows]
        assert count(bq_client, table) == 31
    assert inputs[True] == inputs[False] == ['{"order":{"item":"tea","qty":2},"plain":"Plain()"}']


def test_rows_the_writer_process_holds_are_written_after_the_app_is_killed(
    emulator, bq_client, table_name
) -> None:
    child = run_script(emulator, table_name, "wait", writer_process=True, batch_age_s=3600)
    assert child.stdout is not None
    held, built, written, pid = child.stdout.readline().split()
    assert (held, built, written) == ("held", "31", "0")  # all in the writer process, unwritten
    child.kill()  # kill -9: no atexit, no drain in the application
    child.wait(timeout=10)
    # the writer process sees its pipe close, drains like at exit and ends
    wait_for(lambda: not alive(int(pid)), 60, "the writer process to end")
    assert count(bq_client, table_name) == 31


def test_a_killed_writer_process_is_replaced_and_what_it_held_is_counted(
    emulator, bq_client, table_name
) -> None:
    handler = process_handler(emulator, table_name, batch_age_s=3600)
    model = FakeListChatModel(responses=["ok"])

    def calls(tag: str, n: int) -> None:
        for i in range(n):
            config = {"callbacks": [handler], "metadata": {"user_id": f"{tag}-{i}"}}
            assert model.invoke("q", config=config).content == "ok"

    calls("first", 50)
    assert handler.flush(timeout=60)
    calls("held", 30)
    wait_for(lambda: handler.stats()["handed_over"] == 80, 60, "the writer process to read 80")
    first_pid = handler.stats()["writer_process"]
    os.kill(first_pid, signal.SIGKILL)
    wait_for(lambda: handler.stats()["dropped"] == 30, 60, "the loss to be counted")
    calls("after", 20)  # the app never notices: a new writer process takes the rows
    assert handler.flush(timeout=60), handler.stats()
    stats = handler.stats()
    assert stats["writer_process"] not in (None, first_pid)
    assert stats["written"] == 70 and stats["dropped"] == 30, stats
    assert stats["accepted"] == 100 and stats["queued"] == 0
    assert_accounted(stats)
    assert "writer process ended with code -9" in stats["last_error"]
    users = query(bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}`")
    expected = [f"first-{i}" for i in range(50)] + [f"after-{i}" for i in range(20)]
    assert sorted(r["user_id"] for r in users) == sorted(expected)
    handler.close()


@pytest.mark.usefixtures("writer_makes_views")
def test_close_is_bounded_when_the_writer_process_hangs_and_nothing_is_lost(
    emulator, bq_client, table_name, tmp_path
) -> None:
    spool = tmp_path / "spool"
    handler = process_handler(emulator, table_name, batch_age_s=3600, spool_dir=str(spool))
    model = FakeListChatModel(responses=["ok"])

    def calls(tag: str, n: int) -> None:
        for i in range(n):
            config = {"callbacks": [handler], "metadata": {"user_id": f"{tag}-{i}"}}
            model.invoke("q", config=config)

    calls("sent", 20)
    wait_for(lambda: handler.stats()["handed_over"] == 20, 60, "the writer process to read 20")
    pid = handler.stats()["writer_process"]
    os.kill(pid, signal.SIGSTOP)  # a hung writer process
    try:
        calls("late", 10)
        started = time.monotonic()
        assert handler.close(timeout=2.0) is False
        elapsed = time.monotonic() - started
        # a hung child would hold it forever; the slack is for a loaded machine
        assert elapsed < 15, f"close(timeout=2) took {elapsed:.2f} s"
        assert handler.stats()["spooled"] == 10  # what it could not hand over, on disk here
    finally:
        os.kill(pid, signal.SIGCONT)
    # the writer process wakes up, writes what it held and ends; a later process replays
    wait_for(lambda: not alive(pid), 60, "the writer process to end")
    replayer = BigQueryAuditHandler(client=bq_client, table=table_name, spool_dir=str(spool))
    wait_for(lambda: replayer.stats()["spool_bytes"] == 0, 60, "the spool to be replayed")
    replayer.close()
    users = query(
        bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}_dedup`"
    )
    expected = [f"sent-{i}" for i in range(20)] + [f"late-{i}" for i in range(10)]
    assert sorted(r["user_id"] for r in users) == sorted(expected)


def test_writer_process_is_declined_clearly_when_it_cannot_be(
    bq_client, table_name, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="langchain_bq_audit")
    with_client = BigQueryAuditHandler(client=bq_client, table=table_name, writer_process=True)
    assert type(with_client._writer) is Writer
    assert "a client object cannot be passed" in caplog.text
    model = FakeListChatModel(responses=["still written"])
    model.invoke("q", config={"callbacks": [with_client]})
    assert with_client.flush(timeout=60)
    assert [r["output_text"] for r in rows_of(bq_client, table_name)] == ["still written"]
    with_client.close()

    lambda_redactor = BigQueryAuditHandler(
        table=f"{table_name}_r", emulator_host="127.0.0.1:9", writer_process=True,
        capture_mode="redacted", redactors=[lambda text: text],
    )  # fmt: skip
    assert type(lambda_redactor._writer) is Writer
    assert "settings cannot be pickled" in caplog.text


def test_without_a_python_to_start_the_rows_are_written_from_the_app(
    emulator, bq_client, table_name
) -> None:
    code = """
    import json, sys
    sys.executable = "/usr/local/bin/uwsgi"  # as in an embedding server: not a Python
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_bq_audit import BigQueryAuditHandler
    handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
    model = FakeListChatModel(responses=["x"])
    for i in range(10):
        model.invoke("q", config={"callbacks": [handler]})
    ok = handler.flush(timeout=60)
    print(ok, handler.stats()["writer_process"], handler.stats()["written"])
    """
    import json

    options = {"table": table_name, "project": emulator.project,
               "emulator_host": emulator.endpoint, "writer_process": True}  # fmt: skip
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(options)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["True", "None", "10"]
    assert "no writer process, writing from this process instead" in child.stderr
    assert "is not a Python interpreter" in child.stderr
    assert count(bq_client, table_name) == 10


BUSY_SCRIPT = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_bq_audit import BigQueryAuditHandler

handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))  # writer_process left on auto
chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
         | FakeListChatModel(responses=["ok"]) | StrOutputParser())
config = {"callbacks": [handler]}
chain.invoke({"q": "question 0"}, config=config)
handler.flush(120)  # the table is made
print(json.dumps({"started": True}), flush=True)
if sys.argv[2] == "hold":  # until the test has BigQuery hang
    sys.stdin.readline()
calls, child, deadline = 1, None, time.monotonic() + 240
while child is None and time.monotonic() < deadline:  # a batch job: quick calls, no waits
    for _ in range(200):
        chain.invoke({"q": f"question {calls}"}, config=config)
        calls += 1
    child = handler.stats()["writer_process"]
if sys.argv[2] == "hold":  # moved: the test lets BigQuery answer again
    stats = handler.stats()
    print(json.dumps({"moved": True, "dropped": stats["dropped"]}), flush=True)
    sys.stdin.readline()
for _ in range(200):  # and on, through the writer process
    chain.invoke({"q": f"question {calls}"}, config=config)
    calls += 1
# a later handler asking for the thread is told the table's writer is now a process
BigQueryAuditHandler(**json.loads(sys.argv[1]), writer_process=False)
stats = handler.stats()
print(json.dumps({"calls": calls, "child": child, "app": os.getpid(),
                  "accepted": stats["accepted"]}), flush=True)
"""  # exits: the atexit drain writes what is left


def test_a_busy_writer_thread_hands_over_to_a_writer_process_and_no_row_is_lost(
    emulator, bq_client, table_name
) -> None:
    """`writer_process` auto in a script (no server imported): the writer starts as a thread;
    once the thread has used 10% of a CPU over 5 s (a tight loop of quick calls uses about
    30%), it hands over to a writer process. Every run is one row, before and after (the
    rows the thread had not sent are spooled at the move and replayed by the writer
    process), and each writer's rows form a chain of their own."""
    import json

    options = {"table": table_name, "project": emulator.project,
               "emulator_host": emulator.endpoint, "shutdown_timeout_s": 120}  # fmt: skip
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BUSY_SCRIPT), json.dumps(options), "run"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    said = json.loads(child.stdout.splitlines()[-1])
    assert said["child"] not in (None, said["app"]), said  # it did hand over
    assert "moved to a writer process" in child.stderr, child.stderr
    assert "were not written" not in child.stderr and "dropped" not in child.stderr
    assert "ignored for it: writer_process=False (is True)" in child.stderr, child.stderr
    assert said["accepted"] == 4 * said["calls"]
    rows = query(bq_client, f"SELECT * FROM `{bq_client.project}.{DATASET}.{table_name}`")
    # a batch in flight when the move ran out of time may be there twice (it was spooled
    # too): one event_id, as at a close's deadline
    by_id = {r["event_id"]: r for r in rows}
    assert len(by_id) == said["accepted"]
    asked = sorted(r["input_text"] for r in by_id.values() if r["run_type"] == "chat_model")
    assert asked == sorted(f"user: question {i}" for i in range(said["calls"]))
    report = verify(rows)
    assert report.ok, report.findings
    assert len(report.rows) == 2  # the thread's chain, then the writer process's


def test_the_move_to_a_writer_process_never_waits_on_a_hung_bigquery(
    emulator, bq_client, proxy, table_name
) -> None:
    """BigQuery hangs while the busy writer thread moves (found by a breaker: the move
    waited for the thread's unsent rows up to `shutdown_timeout_s`, the run queue filled
    meanwhile and half the runs were dropped). The move spools them at once: nothing is
    dropped, and once BigQuery answers again every run is in the table."""
    import json

    options = {"table": table_name, "project": emulator.project,
               "emulator_host": proxy.host_port, "shutdown_timeout_s": 120}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(BUSY_SCRIPT), json.dumps(options), "hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert json.loads(child.stdout.readline()) == {"started": True}
        proxy.set_mode("stall")
        child.stdin.write("hang\n")
        child.stdin.flush()
        moved = json.loads(child.stdout.readline())
        assert moved == {"moved": True, "dropped": 0}
        proxy.set_mode("pass")
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=600)
    finally:
        child.kill()
    assert child.returncode == 0, err
    said = json.loads(out.splitlines()[-1])
    assert "moved to a writer process" in err and "dropped" not in err, err
    # what the writer process could not replay before the script ended: the next process
    replay_spool(emulator, table_name)
    rows = query(bq_client, f"SELECT event_id, input_text, run_type FROM "
                            f"`{bq_client.project}.{DATASET}.{table_name}`")  # fmt: skip
    assert len({r["event_id"] for r in rows}) == said["accepted"] == 4 * said["calls"]


@pytest.mark.parametrize("process", [True, False], ids=["writer process", "writer thread"])
def test_close_while_calls_keep_arriving_writes_and_counts_each_run_once(
    emulator, bq_client, table_name, process
) -> None:
    """`close()` from one thread while others go on calling (a server's shutdown hook, a
    request still in flight), for either writer. Found by a breaker: the writer process was
    sent batches after it had been told to close; it never read them, the next writer
    process did, and the close spooled them as well: 500-1,000 rows counted twice and
    `verify` reporting gaps. Then, for both writers: a close after the builder had gone
    quiet returned at once, while the rows it had handed over were still being sent (by a
    writer process draining its closed pipe, or by a sender thread beside a new one), so
    the last `close()` said True with ~300-1,700 rows neither written nor queued. Each run
    is written once and counted once, the last close waits for all, and every chain
    verifies."""
    handler, chain = handler_and_chain(emulator, table_name, writer_process=process,
                                       shutdown_timeout_s=60)  # fmt: skip
    stop = threading.Event()
    calls = [0, 0]

    def loop(i: int) -> None:
        while not stop.is_set():
            chain.invoke({"q": f"{i}-{calls[i]}"}, config={"callbacks": [handler]})
            calls[i] += 1
            time.sleep(0.005)  # a busy server, not a flood: the table stays small

    chain.invoke({"q": "first"}, config={"callbacks": [handler]})
    assert handler.flush(120)  # the table is made
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            more = handler.stats()["accepted"] + 400
            wait_for(lambda n=more: handler.stats()["accepted"] > n, 120, "more calls")
            handler.close(60)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert handler.close(120), handler.stats()
    stats = handler.stats()
    assert stats["accepted"] == 4 * (sum(calls) + 1)
    assert_accounted(stats)
    assert stats["written"] == stats["accepted"], stats
    rows = rows_of(bq_client, table_name)
    assert len(rows) == len({r["event_id"] for r in rows}) == stats["accepted"]
    report = verify(rows)
    assert report.ok, report.findings


def test_a_close_out_of_time_counts_the_batch_in_flight_once(
    emulator, bq_client, table_name
) -> None:
    """Found by a breaker: `close(0.3)` with far more rows queued than that time writes
    spools what is left, the batch in flight included, while that batch's insert goes on
    and succeeds. It was counted both `spooled` and `written` (500 rows too many, in 3 of
    3 runs). Now the close's spooling counts it, once; the spool's copies, replayed later
    (here by `bq-audit replay`), share their event ids."""
    handler, chain = handler_and_chain(emulator, table_name, writer_process=False)
    config: Any = {"callbacks": [handler]}
    chain.invoke({"q": "first"}, config=config)
    assert handler.flush(120)  # the table is made
    for i in range(1500):
        chain.invoke({"q": f"question {i}"}, config=config)
    handler.close(0.3)  # 6,000 rows: more than the emulator writes in 0.3 s
    assert handler.flush(120)  # after the close's batch in flight has ended
    stats = handler.stats()
    assert stats["accepted"] == 4 * 1501
    assert stats["spooled"] > 0, stats  # the close did run out of time
    assert_accounted(stats)
    handler.close(60)
    replay_spool(emulator, table_name)
    rows = rows_of(bq_client, table_name)
    assert len({r["event_id"] for r in rows}) == stats["accepted"]


def test_calls_going_on_after_a_close_out_of_time_are_written_not_spooled(
    emulator, bq_client, table_name
) -> None:
    """Found by a breaker: with three threads calling without a pause, a `close(0.01)`
    (out of time: it spools what is queued and stops sending) left the writer thread
    stopping for good. Its builder never found the queue empty, so it never started
    again, and every later row went to the spool while BigQuery was healthy (20,842 rows
    in 5 s, none replayed). Now the close opens the writer again when its builder is still
    going: rows made after the close are written (and the spool is replayed), and the
    spool holds only what the close put there."""
    handler, chain = handler_and_chain(emulator, table_name, writer_process=False)
    stop = threading.Event()
    calls = [0, 0, 0]

    def loop(i: int) -> None:
        while not stop.is_set():
            chain.invoke({"q": f"{i}-{calls[i]}"}, config={"callbacks": [handler]})
            calls[i] += 1

    chain.invoke({"q": "first"}, config={"callbacks": [handler]})
    assert handler.flush(120)  # the table is made
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: handler.stats()["accepted"] > 2000, 120, "calls")
        handler.close(0.01)
        # a batch taken while the close had the writer stop may still go to the spool
        settled = handler.stats()["accepted"] + 2000
        wait_for(lambda: handler.stats()["accepted"] > settled, 120, "calls after the close")
        spooled = handler.stats()["spooled"]
        more = handler.stats()["accepted"] + 8000
        wait_for(lambda: handler.stats()["accepted"] > more, 120, "more calls")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    handler.close(120)  # False if a row was spooled since the first close: true to its word
    stats = handler.stats()
    assert stats["accepted"] == 4 * (sum(calls) + 1)
    assert_accounted(stats)
    # nothing more, BigQuery being healthy, but for rows the builder set aside to spool
    # while the close had it stop: its last part of a batch (`batch_rows`, 500) at most
    assert stats["spooled"] - spooled < 500, (spooled, stats)
    replay_spool(emulator, table_name)
    rows = rows_of(bq_client, table_name)
    assert len({r["event_id"] for r in rows}) == stats["accepted"]
    report = verify(rows)
    assert report.ok, report.findings
