"""The writer's pipeline against an in-memory sink (the project's own `Sink`): batching,
retries, the breaker, the spool and replay, build errors, and the accounting rule."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from langchain_bq_audit.records import RunRecord
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.sinks.base import ConfigurationError, PermanentError, RetryableError
from langchain_bq_audit.sinks.memory import MemorySink
from langchain_bq_audit.spool import Spool, encode, read_segment
from langchain_bq_audit.writer import SETTLED, Writer

DEST = "local.language_model_logging.t"


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def make(tmp_path: Path, sink: MemorySink | None = None, **options: Any) -> Writer:
    options = {"project": "local", "table": "t", "spool_dir": str(tmp_path / "spool"),
               "batch_age_s": 0.02,
               "handle_sigterm": False, **options}  # fmt: skip
    return Writer(AuditSettings(**options), sink=sink or MemorySink())


def quiet(writer: Writer) -> dict[str, Any]:
    """Flush, then the stats once nothing is queued; asserts the accounting rule."""
    writer.flush(30)
    wait_for(lambda: writer.stats()["queued"] == 0)
    stats = writer.stats()
    assert stats["accepted"] == sum(stats[k] for k in SETTLED) + stats["queued"], stats
    return stats


def row(i: int, pad: int = 0) -> dict[str, Any]:
    return {"event_id": f"e{i}", "timestamp": "2026-11-30T00:00:00.000000Z", "tags": [],
            "input_text": "x" * pad, "output_text": "", "run_type": "chain"}  # fmt: skip


def record(**kw: Any) -> RunRecord:
    rid = uuid4()
    rec = RunRecord("chain", rid, None, rid, None, {"q": "x"}, "c", [], kw.pop("metadata", {}),
                    None, time.time())  # fmt: skip
    rec.end_time = time.time()
    rec.outputs = "y"
    for key, value in kw.items():
        setattr(rec, key, value)
    return rec


def test_rows_are_written_once_and_counted(tmp_path) -> None:
    sink = MemorySink()
    writer = make(tmp_path, sink)
    for i in range(250):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["accepted"], stats["written"]) == (250, 250)
    assert sorted(sink.rows) == sorted(f"e{i}" for i in range(250))
    writer.close()


def test_a_retryable_failure_is_retried_then_written(tmp_path, caplog) -> None:
    sink = MemorySink()
    sink.fail_next = [RetryableError("503 backendError"), RetryableError("429 rateLimited")]
    writer = make(tmp_path, sink, batch_age_s=60)  # one batch, sent by the flush
    for i in range(10):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["written"], stats["retried"], stats["spooled"]) == (10, 20, 0)
    assert len(sink.requests) == 3
    writer.close()


def test_an_outage_spools_then_the_spool_is_replayed_oldest_first(tmp_path) -> None:
    sink = MemorySink()
    sink.fail_with = RetryableError("connection reset")
    writer = make(tmp_path, sink, batch_deadline_s=0.3, batch_rows=10)
    for i in range(30):
        writer.submit(row(i))
        if i % 10 == 9:
            writer.flush(30)  # three separate appends while down
    stats = quiet(writer)
    assert (stats["spooled"], stats["written"], stats["bigquery_down"]) == (30, 0, True)
    sink.fail_with = None  # BigQuery is back: the next probe (within 1 s) replays
    wait_for(lambda: writer.stats()["replayed"] == 30)
    stats = quiet(writer)
    assert stats["bigquery_down"] is False and stats["spool_bytes"] == 0
    replayed = [r["event_id"] for batch in sink.requests[-3:] for r in batch]
    assert replayed == [f"e{i}" for i in range(30)]  # oldest first
    writer.close()


def test_replay_cuts_batches_by_bytes_as_live_sending_does(tmp_path) -> None:
    spool = Spool(tmp_path / "spool", DEST, max_bytes=10**10)
    spool.append([row(i, 100_000) for i in range(150)])  # 15 MB in one segment
    spool.seal()
    sink = MemorySink()
    writer = make(tmp_path, sink, batch_bytes=1_000_000, batch_rows=500)
    writer.ensure_started()
    wait_for(lambda: writer.stats()["replayed"] == 150)
    sizes = [sum(len(encode(r)) for r in batch) for batch in sink.requests]
    assert max(sizes) <= 1_000_000 and len(sink.requests) >= 15, sizes
    writer.close()


def test_a_spool_record_that_is_not_a_row_is_dead_lettered_and_delivery_goes_on(
    tmp_path,
) -> None:
    spool = Spool(tmp_path / "spool", DEST, max_bytes=10**9)
    spool.append([row(1), {"hello": "not a row"}, row(2)])
    spool.seal()
    sink = MemorySink()
    writer = make(tmp_path, sink)
    writer.ensure_started()
    wait_for(lambda: writer.stats()["replay_dead_lettered"] == 1)
    for i in range(3, 6):
        writer.submit(row(i))
    stats = quiet(writer)
    assert stats["bigquery_down"] is False and stats["written"] == 3 and stats["spooled"] == 0
    assert sorted(sink.rows) == ["e1", "e2", "e3", "e4", "e5"]
    assert writer.spool is not None and len(writer.spool.dead_letters()) == 1
    writer.close()


def test_rows_rejected_for_good_are_dead_lettered_not_retried(tmp_path) -> None:
    sink = MemorySink()
    sink.reject = lambda r: "invalid: user_id" if r["event_id"] == "e3" else None
    writer = make(tmp_path, sink)
    for i in range(6):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["written"], stats["dead_lettered"], stats["retried"]) == (5, 1, 0)
    sink.fail_next = [PermanentError("400 invalid request")]
    writer.submit(row(9))
    stats = quiet(writer)
    assert stats["dead_lettered"] == 2
    writer.close()


def test_a_configuration_error_is_not_retried_and_says_what_to_fix(tmp_path, caplog) -> None:
    sink = MemorySink()
    sink.fail_with = ConfigurationError("403 Forbidden: permission denied")
    writer = make(tmp_path, sink, batch_deadline_s=60, batch_age_s=60)  # one batch
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
        for i in range(5):
            writer.submit(row(i))
        stats = quiet(writer)
    assert time.monotonic() - started < 30  # not the 60 s batch deadline of an outage
    assert (stats["spooled"], stats["retried"], stats["bigquery_down"]) == (5, 0, True)
    assert len(sink.requests) == 1
    assert "cannot write to" in caplog.text and "permission denied" in caplog.text
    writer.close()


def test_a_run_that_cannot_be_built_whole_still_leaves_a_row(tmp_path) -> None:
    sink = MemorySink()
    settings = AuditSettings(user_id_key="k" * 32)
    writer = make(tmp_path, sink, user_id_key="k" * 32)
    odd_time = record(metadata={"user_id": "u1"})
    odd_time.start_time = "yesterday"  # type: ignore[assignment]
    int_user = record(metadata={"user_id": 12345})
    fine = [record(metadata={"user_id": f"u{i}"}) for i in range(3)]
    for rec in [odd_time, int_user, *fine]:
        rec.settings = settings
        writer.submit(rec)
    stats = quiet(writer)
    # nothing vanishes, and the rows beside a bad one are untouched
    assert (stats["accepted"], stats["written"], stats["dropped"]) == (5, 5, 0)
    by_run = {r["run_id"]: r for r in sink.rows.values()}
    assert "could not render this run" in by_run[str(odd_time.run_id)]["error_message"]
    assert by_run[str(int_user.run_id)]["user_id"] != "12345"  # never in clear
    for rec in fine:
        assert by_run[str(rec.run_id)]["output_text"] == "y"
    writer.close()


def test_the_in_memory_queue_bound_drops_and_counts(tmp_path, caplog) -> None:
    writer = make(tmp_path, max_queue_rows=10, batch_rows=10_000, batch_age_s=60)
    old = sys.getswitchinterval()
    sys.setswitchinterval(30)  # the builder cannot take the GIL during the burst
    try:
        with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
            for i in range(100):
                writer.submit(row(i))
    finally:
        sys.setswitchinterval(old)
    stats = quiet(writer)
    assert (stats["accepted"], stats["dropped"], stats["written"]) == (100, 90, 10)
    assert caplog.text.count("max_queue_rows") == 1  # rate-limited, not once per row
    writer.close()


def test_with_the_spool_disabled_an_outage_drops_and_counts(tmp_path) -> None:
    sink = MemorySink()
    sink.fail_with = RetryableError("down")
    writer = make(tmp_path, sink, spool_enabled=False, batch_deadline_s=0.2)
    for i in range(7):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["dropped"], stats["spooled"]) == (7, 0)
    assert "spool disabled" in stats["last_error"]
    writer.close()


def test_a_full_spool_budget_drops_and_counts(tmp_path) -> None:
    sink = MemorySink()
    sink.fail_with = RetryableError("down")
    one = len(encode(row(0)))
    writer = make(tmp_path, sink, max_spool_bytes=one * 4, batch_deadline_s=0.2, hash_chain=False)
    for i in range(10):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["spooled"], stats["dropped"]) == (4, 6)
    assert "max_spool_bytes" in stats["last_error"]
    writer.close()


def test_a_full_memory_buffer_spools_what_does_not_fit_and_replays_it(tmp_path) -> None:
    sink = MemorySink()
    sink.gate.clear()  # BigQuery is slow: the first request hangs a while
    writer = make(tmp_path, sink, max_buffer_bytes=50_000, batch_rows=5)
    for i in range(40):
        writer.submit(row(i, 5_000))
    wait_for(lambda: writer.stats()["spooled"] > 0)
    sink.gate.set()
    wait_for(lambda: writer.stats()["replayed"] == writer.stats()["spooled"])
    stats = quiet(writer)
    assert stats["written"] + stats["spooled"] == 40 and stats["dropped"] == 0
    assert sorted(sink.rows) == sorted(f"e{i}" for i in range(40))
    writer.close()


def test_the_breaker_probes_with_backoff_while_down(tmp_path) -> None:
    from langchain_bq_audit.retry import PROBE_FIRST_S, PROBE_MAX_S, Breaker, backoff_delays

    breaker = Breaker()
    assert breaker.probe_due() and breaker.failed() is True
    assert not breaker.probe_due()
    waits = [breaker.probe_wait]
    for _ in range(8):
        breaker.failed()
        waits.append(breaker.probe_wait)
    assert waits[0] == PROBE_FIRST_S and waits[-1] == PROBE_MAX_S
    assert waits == sorted(waits)
    breaker.succeeded()
    assert breaker.probe_due() and breaker.probe_wait == PROBE_FIRST_S
    delays = backoff_delays()
    firsts = [next(delays) for _ in range(10)]
    assert all(0 <= d <= 5.0 for d in firsts) and max(firsts[:1]) <= 0.2


def test_a_batch_cut_short_by_an_outage_spools_only_what_it_had_not_settled(tmp_path) -> None:
    """One row of a batch rejected for good (dead-lettered), then BigQuery goes away before
    the rest is sent again: the spool takes the rest only, not the dead-lettered row too
    (which counted it twice: accepted 6, settled 7)."""
    sink = MemorySink()

    def reject(r: dict[str, Any]) -> str | None:
        if r["event_id"] != "e3":
            return None
        sink.fail_with = RetryableError("503 backendError")  # from the next request on
        return "invalid: user_id"

    sink.reject = reject
    writer = make(tmp_path, sink, batch_deadline_s=1.0)
    for i in range(6):
        writer.submit(row(i))
    stats = quiet(writer)
    assert (stats["dead_lettered"], stats["spooled"], stats["written"]) == (1, 5, 0), stats
    writer.close(5)


def test_close_spools_what_a_hung_bigquery_holds_within_its_timeout(tmp_path) -> None:
    sink = MemorySink()
    sink.gate.clear()  # hangs until released
    writer = make(tmp_path, sink)
    for i in range(20):
        writer.submit(row(i))
    started = time.monotonic()
    assert writer.close(timeout=1.0) is False
    assert time.monotonic() - started < 15
    stats = writer.stats()
    assert stats["spooled"] == 20 and stats["accepted"] == 20
    sink.gate.set()


def test_a_second_drain_spools_the_batch_in_flight_once(tmp_path) -> None:
    """SIGTERM's drain, then the exit's, while a hung request holds a batch: each row is
    spooled once (a CI run found every row twice after SIGTERM with BigQuery hung)."""
    import threading

    entered = threading.Event()

    class Hung(MemorySink):
        def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
            entered.set()
            return super().write(rows, ids)

    sink = Hung()
    sink.gate.clear()  # the first request hangs
    writer = make(tmp_path, sink)
    for i in range(20):
        writer.submit(row(i))
    wait_for(entered.is_set)  # the batch is in flight
    writer.spool_memory()
    writer.spool_memory()
    spool = writer.spool
    assert spool is not None
    ids = [r["event_id"] for seg in spool.segments() for r in read_segment(seg).records]
    assert sorted(ids) == sorted(row(i)["event_id"] for i in range(20))
    assert writer.stats()["spooled"] == 20
    sink.gate.set()
    writer.close(timeout=5)


@pytest.mark.parametrize("option", ["batch_rows", "batch_deadline_s"])
def test_a_second_handler_asking_other_delivery_options_is_told_by_name(
    tmp_path, caplog, option
) -> None:
    from langchain_bq_audit.registry import get_writer

    table = f"t_{option}_{uuid4().hex[:6]}"
    base = AuditSettings(project="local", table=table, spool_dir=str(tmp_path),
                         handle_sigterm=False)  # fmt: skip
    first = get_writer(base)
    value = 10 if option == "batch_rows" else 1.0
    with caplog.at_level(logging.WARNING, "langchain_bq_audit"):
        second = get_writer(base.replace(**{option: value}, app_name="other"))
    assert second is first
    assert f"{option}={value!r}" in caplog.text and "ignored" in caplog.text
    assert "app_name" not in caplog.text  # a row option: each handler's own


def test_runs_pending_at_close_are_written_as_abandoned_unless_filtered_out(tmp_path) -> None:
    sink = MemorySink()
    writer = make(tmp_path, sink)
    kept, sampled_out, filtered = record(), record(), record()
    sampled_out.keep, filtered.keep = None, False
    for rec in (kept, sampled_out, filtered):
        rec.end_time = None
        writer.tracker.runs[rec.run_id] = rec
    assert writer.close(timeout=30)
    rows = {r["run_id"]: r for r in sink.rows.values()}
    assert set(rows) == {str(kept.run_id), str(sampled_out.run_id)}
    assert {r["status"] for r in rows.values()} == {"abandoned"}
    assert rows[str(sampled_out.run_id)]["sample_rate"] == 1.0
    stats = writer.stats()
    assert (stats["accepted"], stats["written"]) == (2, 2)


@pytest.mark.parametrize("spool", ["healthy", "read-only"])
def test_a_retired_channel_spools_its_unsent_rows_or_else_sends_them(
    tmp_path, tmpfs, spool: str
) -> None:
    """The hand-over to a writer process retires the thread's channel (`ThreadChannel.retire`):
    its unsent rows go to the spool for the child to replay; rows the spool cannot take (a
    breaker remounted it read-only) are sent by the old sender before it ends, never
    dropped. Its batch in flight is finished either way."""
    from ..conftest import remount

    root = tmpfs(4 << 20)
    sink = MemorySink()
    sink.gate.clear()  # the first batch hangs in flight
    writer = make(tmp_path, sink, spool_dir=str(root), batch_rows=5)
    channel = writer._channel
    for i in range(20):
        writer.submit(row(i))
    wait_for(lambda: len(channel._rows) == 15)  # one batch in flight, three buffered
    if spool == "read-only":
        remount(root, "ro")
    spooled = channel.retire()  # type: ignore[attr-defined]
    sink.gate.set()
    assert channel.wait_sent(time.monotonic() + 30)  # type: ignore[attr-defined]
    stats = writer.stats()
    assert stats["dropped"] == 0 and stats["queued"] == 0, stats
    if spool == "healthy":
        assert spooled == stats["spooled"] == 15 and stats["written"] == 5
        records = [r for seg in writer.spool.segments()  # type: ignore[union-attr]
                   for r in read_segment(seg).records]  # fmt: skip
        assert sorted(r["event_id"] for r in records) == sorted(f"e{i}" for i in range(5, 20))
    else:
        assert spooled == stats["spooled"] == 0 and stats["written"] == 20
        assert sorted(sink.rows) == sorted(f"e{i}" for i in range(20))
    if spool == "read-only":
        remount(root, "rw")
    writer.close(5)
