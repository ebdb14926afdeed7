"""Delivery guarantees under real faults: outages, hangs, SIGTERM, kill -9, bad rows, fork."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.spool import read_segment
from langchain_bq_audit.views import dedup

from .conftest import (
    assert_accounted,
    count,
    create_table_with_required_user,
    delivered,
    query,
    wait_for,
)
from .proxy import FaultProxy

DATASET = "language_model_logging"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def through(proxy: FaultProxy) -> Any:
    """A BigQuery client whose every request crosses the fault proxy."""
    from langchain_bq_audit.client import make_client

    return make_client(AuditSettings(emulator_host=proxy.host_port, project=proxy.project))


@pytest.mark.usefixtures("writer_makes_views")  # read through the `_dedup` view itself
def test_outage_in_the_middle_of_10000_calls_loses_nothing(
    proxy, bq_client, table_name, spool_dir
) -> None:
    handler = BigQueryAuditHandler(
        client=through(proxy), table=table_name, spool_dir=str(spool_dir),
        batch_age_s=0.05, request_timeout_s=10.0, batch_deadline_s=3.0,
    )  # fmt: skip
    model = FakeListChatModel(responses=["ok"])
    for i in range(10_000):
        if i == 2_000:
            delivered(handler, 2_000)  # the table exists and rows flow
            proxy.set_mode("reset")
        if i == 8_000:  # keep the outage until it outlasts the retries and rows hit disk
            wait_for(lambda: handler.stats()["spooled"] > 0, 90, "rows to be spooled")
            proxy.set_mode("pass")
        model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": str(i)}})

    delivered(handler, 10_000, 180)  # the next probe finds BigQuery back (at most 30 s)
    stats = handler.stats()
    assert_accounted(stats)
    assert stats["accepted"] == stats["written"] + stats["spooled"] == 10_000
    assert stats["spooled"] > 0, "the outage should have sent rows to the spool"
    assert stats["replayed"] == stats["spooled"]
    assert stats["dropped"] == stats["dead_lettered"] == 0
    ids = query(
        bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}_dedup`"
    )
    assert sorted(int(r["user_id"]) for r in ids) == list(range(10_000))
    assert count(bq_client, table_name, dedup=True) == 10_000
    handler.close()


CHILD = """
import json, sys, time
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_bq_audit import BigQueryAuditHandler
handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
model = FakeListChatModel(responses=["child"])
for i in range(int(sys.argv[2])):
    meta = {"user_id": f"{sys.argv[3]}-{i}"}
    model.invoke("q", config={"callbacks": [handler], "metadata": meta})
print("last-call", time.time(), flush=True)
print("writer-pid", handler.stats()["writer_process"], flush=True)
"""


def gone(pid: int) -> bool:
    """True once process `pid` (not necessarily our child) has ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie has ended too
        return f.read().split(")")[-1].split()[0] == "Z"


def child_env(host: str, spool_dir: Path) -> dict[str, str]:
    return {**os.environ, "BIGQUERY_EMULATOR_HOST": host, "BQ_AUDIT_SPOOL_DIR": str(spool_dir)}


def spawn(code: str, options: dict[str, Any], n: int, tag: str, env: dict[str, str],
          **kwargs: Any) -> subprocess.Popen[str]:  # fmt: skip
    import json

    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), json.dumps(options), str(n), tag],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


# the head of the line a drain that ran out of time writes on stderr: (rows) for `dest`
EXIT_LINE = r"(\d+) rows for {dest} were not written in the time the exit drain had"


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
@pytest.mark.usefixtures("writer_makes_views")  # a new table's views: said to come later
def test_hung_bigquery_exit_is_bounded_and_the_next_process_replays(
    proxy, bq_client, table_name, spool_dir, writer_process: bool
) -> None:
    proxy.set_mode("stall")
    # an unbounded exit would wait out the 30 s request timeout and the 40 s batch deadline
    options = {"table": table_name, "batch_age_s": 3600, "shutdown_timeout_s": 2.0,
               "request_timeout_s": 30.0, "batch_deadline_s": 40.0,
               "writer_process": writer_process}  # fmt: skip
    child = spawn(CHILD, options, 20, "hung", child_env(proxy.host_port, spool_dir))
    out, err = child.communicate(timeout=90)
    exited = time.time()
    assert child.returncode == 0, err
    # said on stderr, by the app's drain or the writer process's: how many, where, what next
    line = EXIT_LINE.format(dest=rf"\S+\.{table_name}")
    said = re.findall(line + r" \(shutdown_timeout_s\); \1 are in the spool \(([^)]+)\)", err)
    assert sum(int(n) for n, _ in said) >= 20, err
    assert all(Path(folder).parent == spool_dir for _, folder in said), err
    assert "bq-audit replay" in err
    assert "the views are made after the first write (or now by `bq-audit init`)" in err
    last_call = float(out.split()[1])
    # the drain's 2 s plus interpreter teardown, however slow a loaded machine makes it,
    # stays far below the request timeout an unbounded exit would wait for
    assert exited - last_call < 25, f"exit took {exited - last_call:.2f} s after the work"
    writer_pid = out.split()[3]
    if writer_pid != "None":  # after the app is gone, the writer process drains on its own
        # for up to batch_deadline_s (nobody waits for it), then spools what it holds
        wait_for(lambda: gone(int(writer_pid)), 40 + 60, "the writer process to end")

    segments = sorted(spool_dir.rglob("*.seg"))
    spooled = [r for seg in segments for r in read_segment(seg).records]
    # a run the writer process held may be spooled by it and by the app (one event_id)
    distinct = {r["event_id"]: r["user_id"] for r in spooled}
    assert sorted(distinct.values()) == sorted(f"hung-{i}" for i in range(20))

    # a second process for the same destination, with BigQuery reachable, replays them
    # (its exit drain's deadline is not the point here: a long one, for a loaded machine)
    second = spawn(CHILD, {"table": table_name, "shutdown_timeout_s": 120}, 0, "none",
                   child_env(f"127.0.0.1:{proxy.target[1]}", spool_dir))  # fmt: skip
    _, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    rows = query(bq_client, dedup(f"{bq_client.project}.{DATASET}.{table_name}"))
    assert sorted(r["user_id"] for r in rows) == sorted(f"hung-{i}" for i in range(20))
    assert not list(spool_dir.rglob("*.seg")), "replayed segments are removed"


SURVIVOR = """
import json, signal, sys, time
from langchain_core.language_models.fake_chat_models import FakeListChatModel
signal.signal(signal.SIGTERM, lambda s, f: None)  # the app's own: the process goes on
from langchain_bq_audit import BigQueryAuditHandler
options = json.loads(sys.argv[1])
then = options.pop("then")  # "close": the app closes the handler itself, then exits
handler = BigQueryAuditHandler(**options)
model = FakeListChatModel(responses=["child"])
def work(tag):
    for i in range(int(sys.argv[2])):
        meta = {"user_id": f"{tag}-{i}"}
        model.invoke("q", config={"callbacks": [handler], "metadata": meta})
work(sys.argv[3])
signal.raise_signal(signal.SIGTERM)
time.sleep(options["shutdown_timeout_s"] + 3)  # the drain runs, spools and is done
print("after-sigterm", file=sys.stderr, flush=True)  # marks stderr: what comes after
work(sys.argv[3] + "-later")
if then == "close":
    handler.close(timeout=0.1)  # the app's own close, short: not an exit drain
    time.sleep(3)  # a writer process answers its close
print("exiting", file=sys.stderr, flush=True)
"""

LEFT = re.compile(EXIT_LINE.format(dest=r"\S+"))


def survive_sigterm(proxy: FaultProxy, table: str, spool_dir: Path, writer_process: bool,
                    then: str) -> tuple[str, dict[str, str]]:  # fmt: skip
    """`SURVIVOR` with BigQuery stalled: 10 rows, a SIGTERM its handler survives, 10 more,
    then `then` ("exit" or "close"); its stderr and the spool's rows (event id: user)."""
    proxy.set_mode("stall")
    options = {"table": table, "batch_age_s": 3600, "shutdown_timeout_s": 1.0,
               "batch_deadline_s": 3.0, "writer_process": writer_process,
               "then": then}  # fmt: skip
    child = spawn(SURVIVOR, options, 10, "kept", child_env(proxy.host_port, spool_dir))
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    spooled = {r["event_id"]: r["user_id"] for seg in spool_dir.rglob("*.seg")
               for r in read_segment(seg).records}  # fmt: skip
    return err, spooled


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
def test_a_survived_sigterm_then_exit_says_each_drains_rows(
    proxy, table_name, spool_dir, writer_process: bool
) -> None:
    # the app's SIGTERM handler keeps the process going: its drain spools the first rows
    # and says so; the rows of after that, spooled by the exit drain, are said too
    err, spooled = survive_sigterm(proxy, table_name, spool_dir, writer_process, "exit")
    before, after = err.split("exiting", 1)
    assert sum(int(n) for n in LEFT.findall(before)) >= 10, err
    assert sum(int(n) for n in LEFT.findall(after)) >= 10, err  # was said once a minute
    if not writer_process:  # one writer, one line per drain, exactly its rows
        assert [int(n) for n in LEFT.findall(err)] == [10, 10], err
    assert sorted(spooled.values()) == sorted(
        [f"kept-{i}" for i in range(10)] + [f"kept-later-{i}" for i in range(10)]
    )


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
def test_the_apps_own_short_close_after_a_survived_sigterm_is_no_exit_drain(
    proxy, table_name, spool_dir, writer_process: bool
) -> None:
    # after a SIGTERM the process survived, `close(timeout=0.1)` of the app's own spools
    # what it had no time for, as any close does: it answers False, and no line calls it
    # the exit drain's
    err, spooled = survive_sigterm(proxy, table_name, spool_dir, writer_process, "close")
    before, after = err.split("after-sigterm", 1)
    assert sum(int(n) for n in LEFT.findall(before)) >= 10, err  # the SIGTERM drain's
    assert not LEFT.findall(after), err
    assert len(spooled) == 20


QUICK = """
import json, sys
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_bq_audit import BigQueryAuditHandler
handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
model = FakeListChatModel(responses=["child"])
for i in range(int(sys.argv[2])):  # then exit at once: the writer process is still starting
    meta = {"user_id": f"{sys.argv[3]}-{i}"}
    model.invoke("q", config={"callbacks": [handler], "metadata": meta})
"""


def test_rows_the_writer_process_had_not_acknowledged_at_exit_are_counted_once(
    proxy, table_name, spool_dir
) -> None:
    # a 0.1 s exit drain ends before the writer process (still importing) has read its
    # batches: the app spools them, and so does the writer process once it reads them after
    # the app is gone; both say so, and a user adding the lines up must not count them twice
    proxy.set_mode("stall")
    options = {"table": table_name, "batch_age_s": 3600, "shutdown_timeout_s": 0.1,
               "batch_deadline_s": 3.0, "writer_process": True}  # fmt: skip
    child = spawn(QUICK, options, 50, "quick", child_env(proxy.host_port, spool_dir))
    _, err = child.communicate(timeout=120)  # until the writer process closes stderr too
    assert child.returncode == 0, err
    said = sum(int(n) for n in LEFT.findall(err))
    twice = sum(int(n) for n in re.findall(r"(\d+) of them the writer process was sent but "
                                           r"had not acknowledged: it may write or spool "
                                           r"them too", err))  # fmt: skip
    records = [r for seg in spool_dir.rglob("*.seg") for r in read_segment(seg).records]
    distinct = {r["event_id"]: r["user_id"] for r in records}
    assert sorted(distinct.values()) == sorted(f"quick-{i}" for i in range(50))
    # the lines, less what may be said twice, never say more rows than there are; the
    # writer process may not have read (or spooled) every row it was sent before its pipe
    # closed, so "may" is no promise that it says them all
    assert said - twice <= len(distinct) == 50 <= said, err
    assert len(records) - 50 <= twice, err  # the copies the app and the writer process spooled


SLEEPER = (
    CHILD
    + """
time.sleep(60)
"""
)


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
def test_sigterm_half_a_second_after_the_last_call_writes_every_row(
    emulator, bq_client, table_name, spool_dir, writer_process: bool
) -> None:
    # the drain's deadline is not the point here: a long one, for a loaded machine
    options = {"table": table_name, "batch_age_s": 3600, "writer_process": writer_process,
               "shutdown_timeout_s": 60}  # fmt: skip
    child = spawn(SLEEPER, options, 20, "term", child_env(emulator.host_port, spool_dir))
    assert child.stdout is not None
    assert child.stdout.readline().startswith("last-call")
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=90)
    assert child.returncode == -signal.SIGTERM  # it still dies of SIGTERM, after draining
    assert count(bq_client, table_name, dedup=False) == 20


def test_kill_9_loses_at_most_what_was_only_in_memory(
    emulator, bq_client, table_name, spool_dir
) -> None:
    code = """
    import json, sys, time
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_bq_audit import BigQueryAuditHandler
    handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
    model = FakeListChatModel(responses=["x"])
    cfg = lambda i: {"callbacks": [handler], "metadata": {"user_id": str(i)}}
    for i in range(100):
        model.invoke("q", config=cfg(i))
    assert handler.flush(timeout=60)
    for i in range(100, 150):
        model.invoke("q", config=cfg(i))
    print("in-memory", handler.stats()["queued"], flush=True)
    time.sleep(60)
    """
    child = spawn(code, {"table": table_name, "batch_age_s": 3600}, 0, "",
                  child_env(emulator.host_port, spool_dir))  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["in-memory", "50"]
    child.kill()
    child.wait(timeout=10)
    # the 50 in memory are the documented loss
    assert count(bq_client, table_name, dedup=False) == 100
    assert not list(spool_dir.rglob("*.seg"))


def test_kill_9_while_spooling_leaves_a_readable_spool(
    tmp_path, emulator, bq_client, table_name, spool_dir
) -> None:
    """Killed mid-write, the spool may end in a torn record: replay skips and counts it."""
    dead_port = FaultProxy(1)  # nothing behind it: every connection is reset
    dead_port.set_mode("reset")
    code = """
    import json, sys, time
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_bq_audit import BigQueryAuditHandler
    handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
    model = FakeListChatModel(responses=["x" * 2000])
    i = 0
    while True:
        model.invoke("q", config={"callbacks": [handler], "metadata": {"user_id": str(i)}})
        i += 1
        if i % 500 == 0:
            print("spooled", handler.stats()["spooled"], flush=True)
    """
    # the writer thread, for good: this loop is busy enough that a writer on auto would
    # move to a writer process, which outlives the kill and goes on spooling
    options = {"table": table_name, "batch_age_s": 0.01, "request_timeout_s": 0.5,
               "batch_deadline_s": 0.5, "writer_process": False}  # fmt: skip
    child = spawn(code, options, 0, "", child_env(dead_port.host_port, spool_dir))
    assert child.stdout is not None
    spooled_seen = 0
    while spooled_seen < 3000:
        spooled_seen = int(child.stdout.readline().split()[1])
    child.kill()
    child.wait(timeout=10)
    dead_port.close()

    segments = sorted(spool_dir.rglob("*.seg"))
    intact = sum(len(read_segment(s).records) for s in segments)
    assert intact >= spooled_seen  # everything the process reported as spooled is on disk
    with open(segments[-1], "ab") as f:  # and a torn tail, as a crash mid-write leaves
        f.write(b'0badc0de {"event_id": "torn", "timest')

    proc = subprocess.run(
        [sys.executable, "-m", "langchain_bq_audit", "replay", "--table", table_name],
        env=child_env(emulator.host_port, spool_dir), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"replayed {intact} rows" in proc.stdout
    assert "1 torn records skipped" in proc.stdout
    assert "replaying [" in proc.stderr  # the progress bar
    assert count(bq_client, table_name, dedup=True) == intact


def test_a_permanently_invalid_row_is_dead_lettered_and_its_batch_written(
    bq_client, table_name, spool_dir
) -> None:
    create_table_with_required_user(bq_client, table_name)

    handler = BigQueryAuditHandler(client=bq_client, table=table_name,
                                   spool_dir=str(spool_dir), batch_age_s=3600)  # fmt: skip
    model = FakeListChatModel(responses=["r"])
    for user in ["a", "b", None, "d", "e"]:
        meta = {"user_id": user} if user else {}
        model.invoke("q", config={"callbacks": [handler], "metadata": meta})
    assert handler.flush(timeout=60) is False  # not everything was written...
    stats = handler.stats()
    assert_accounted(stats)
    assert (stats["written"], stats["dead_lettered"], stats["dropped"]) == (4, 1, 0)
    users = query(bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}`")
    assert sorted(r["user_id"] for r in users) == ["a", "b", "d", "e"]  # ...but its batch was

    (dead,) = handler._writer.spool.dead_letters()
    (record,) = read_segment(dead).records
    assert "Missing required field: user_id" in record["error"]
    assert record["row"]["output_text"] == "r"
    handler.close()


def test_spool_files_are_private(tmp_path, spool_dir) -> None:
    dead = FaultProxy(1)
    dead.set_mode("reset")
    handler = BigQueryAuditHandler(
        table=f"private_{uuid.uuid4().hex[:6]}", emulator_host=dead.host_port,
        spool_dir=str(spool_dir), batch_age_s=0.01, batch_deadline_s=0.2,
    )  # fmt: skip
    FakeListChatModel(responses=["x"]).invoke("q", config={"callbacks": [handler]})
    wait_for(lambda: handler.stats()["spooled"] == 1, 60, "the row to be spooled")
    handler.close(timeout=1)
    dead.close()
    (segment,) = spool_dir.rglob("*.seg")
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    assert stat.S_IMODE(segment.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("writer_process", [False, True], ids=["thread", "process"])
def test_fork_parent_and_child_each_write_their_own_rows_once(
    emulator, bq_client, table_name, spool_dir, writer_process: bool
) -> None:
    code = """
    import json, os, sys
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_bq_audit import BigQueryAuditHandler
    handler = BigQueryAuditHandler(**json.loads(sys.argv[1]))
    model = FakeListChatModel(responses=["x"])
    def call(tag, n):
        for i in range(n):
            model.invoke("q", config={"callbacks": [handler],
                                      "metadata": {"user_id": f"{tag}-{i}"}})
    call("before", 10)  # still queued in the parent when it forks
    pid = os.fork()
    if pid == 0:
        call("child", 5)
        ok = handler.flush(timeout=60)
        os._exit(0 if ok and handler.stats()["written"] == 5 else 3)
    call("parent", 10)
    assert handler.flush(timeout=60)
    _, status = os.waitpid(pid, 0)
    print("child-exit", os.waitstatus_to_exitcode(status), "written", handler.stats()["written"])
    """
    options = {"table": table_name, "batch_age_s": 3600, "writer_process": writer_process}
    proc = spawn(code, options, 0, "", child_env(emulator.host_port, spool_dir))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["child-exit", "0", "written", "20"]
    rows = query(bq_client, f"SELECT user_id FROM `{bq_client.project}.{DATASET}.{table_name}`")
    expected = [f"before-{i}" for i in range(10)] + [f"parent-{i}" for i in range(10)]
    expected += [f"child-{i}" for i in range(5)]
    assert sorted(r["user_id"] for r in rows) == sorted(expected)  # each once, none twice


def test_an_exit_drain_on_a_full_spool_disk_says_it_in_one_line(proxy, table_name, tmpfs) -> None:
    """The exit drain spools onto a disk with room for some of its rows: the one exit line
    says how many are in the spool and how many were dropped (no second line for the
    drop), and exactly the rows it counts as spooled are on disk, none torn."""
    root = tmpfs(64 * 1024)
    proxy.set_mode("stall")
    options = {"table": table_name, "batch_age_s": 3600, "shutdown_timeout_s": 2.0,
               "request_timeout_s": 30.0, "batch_deadline_s": 40.0}  # fmt: skip
    child = spawn(CHILD, options, 200, "full", child_env(proxy.host_port, root))
    _, err = child.communicate(timeout=90)
    assert child.returncode == 0, err
    said = re.findall(
        EXIT_LINE.format(dest=rf"\S+\.{table_name}")
        + r" \(shutdown_timeout_s\); (\d+) are in the spool \([^)]+\): .*?; (\d+) could not "
        r"be spooled \(spool write failed: \[Errno 28\] No space left on device\) and are "
        r"counted as dropped",
        err,
    )
    assert len(said) == 1, err
    held, spooled, dropped = map(int, said[0])
    assert held == 200 and spooled + dropped == 200 and spooled > 0 and dropped > 0, err
    assert [line for line in err.splitlines() if "dropped" in line] == [
        line for line in err.splitlines() if "were not written" in line
    ], err
    segments = sorted(root.rglob("*.seg"))
    assert sum(len(read_segment(s).records) for s in segments) == spooled
    assert sum(read_segment(s).corrupt for s in segments) == 0
