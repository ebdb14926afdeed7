"""Fixtures: one real local BigQuery per test session, a fresh table per test."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.emulator import LocalBigQuery
from langchain_bq_audit.reading import run_query

from .proxy import FaultProxy


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests and the processes they start spool under a folder of this session's own, never
    look for Google's metadata server (only loopback traffic leaves a test), and have the
    writer make the table without its views unless a test asks (`writer_makes_views`)."""
    import os

    values = {
        "BQ_AUDIT_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        # six views cost the embedded BigQuery more CPU than the rest of a typical test;
        # tests that read views, or check what the writer makes, ask (`writer_makes_views`)
        "BQ_AUDIT_AUTO_CREATE_VIEWS": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class ExternalBigQuery:
    """A BigQuery endpoint this test run did not start, named by the environment:
    `BQ_AUDIT_TEST_ENDPOINT=host:port` (its REST API), `BQ_AUDIT_TEST_GRPC=host:port` (its
    Storage Write API, if any) and `BQ_AUDIT_TEST_PROJECT` (default `local`). It has the
    attributes the tests use of `LocalBigQuery`, so the suite runs unchanged against it."""

    def __init__(self, host_port: str, project: str, grpc_target: str | None) -> None:
        self.host_port = host_port.removeprefix("http://")
        self.endpoint = f"http://{self.host_port}"
        self.port = int(self.host_port.rsplit(":", 1)[1])
        self.project = project
        self.grpc_target = grpc_target or ""
        self.grpc_port = int(self.grpc_target.rsplit(":", 1)[1]) if grpc_target else 0

    def client(self) -> Any:
        from langchain_bq_audit.client import make_client
        from langchain_bq_audit.settings import AuditSettings

        return make_client(AuditSettings(emulator_host=self.host_port, project=self.project))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The BigQuery the tests write to: the embedded one, started for this session (with
    pytest-xdist, one per worker), or an endpoint named by `BQ_AUDIT_TEST_ENDPOINT` (see
    `ExternalBigQuery`). When the session ends, no row or spool file it left may hold a
    secret the tests planted (tests/leak_scan.py)."""
    import os

    from .leak_scan import assert_no_secret_left

    endpoint = os.environ.get("BQ_AUDIT_TEST_ENDPOINT")
    if endpoint:
        external = ExternalBigQuery(endpoint, os.environ.get("BQ_AUDIT_TEST_PROJECT", "local"),
                                    os.environ.get("BQ_AUDIT_TEST_GRPC"))  # fmt: skip
        yield external
        assert_no_secret_left(external.client(), tmp_path_factory.getbasetemp())
        return
    bq = LocalBigQuery(tmp_path_factory.mktemp("local-bigquery"))
    # a readiness wait, not a bound: workers start their emulators at once, maybe beside a
    # busy neighbour
    bq.start(timeout=300)
    try:
        yield bq
        # after the session's last test (with xdist: this worker's), over all it wrote
        assert_no_secret_left(bq.client(), tmp_path_factory.getbasetemp())
    finally:
        bq.stop()


@pytest.fixture(scope="session")
def bq_client(emulator: LocalBigQuery) -> Any:
    return emulator.client()


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table of this test's own, so tests cannot see each other's rows."""
    stem = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def make_handler(bq_client: Any, table_name: str) -> Iterator[Callable[..., BigQueryAuditHandler]]:
    """Handlers writing to this test's table on the session emulator."""
    made: list[BigQueryAuditHandler] = []

    def make(**options: Any) -> BigQueryAuditHandler:
        options.setdefault("batch_age_s", 0.1)
        handler = BigQueryAuditHandler(client=bq_client, table=table_name, **options)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close(timeout=10)


@pytest.fixture
def writer_makes_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default a user gets: the writer makes the views after its first write (this
    test's handlers and the processes it starts)."""
    monkeypatch.setenv("BQ_AUDIT_AUTO_CREATE_VIEWS", "true")


@pytest.fixture
def mocks() -> Iterator[Any]:
    """Pulumi's mock runtime, recording every resource declared (see pulumi_mocks.py)."""
    import asyncio

    import pulumi

    from .pulumi_mocks import PROJECT, Recorder

    # Pulumi's runtime wants a current event loop; `asyncio.run` elsewhere leaves none.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    recorder = Recorder()
    pulumi.runtime.set_mocks(recorder, project=PROJECT, stack="test", preview=False)
    yield recorder
    asyncio.set_event_loop(None)
    loop.close()


def _proxied(port: int, project: str) -> Iterator[FaultProxy]:
    p = FaultProxy(port, project=project)
    yield p
    p.close()


@pytest.fixture
def proxy(emulator: LocalBigQuery) -> Iterator[FaultProxy]:
    """A TCP proxy in front of the emulator's HTTP port, to stall or reset on demand."""
    yield from _proxied(emulator.port, emulator.project)


@pytest.fixture
def grpc_proxy(emulator: LocalBigQuery) -> Iterator[FaultProxy]:
    """The same in front of its gRPC port (the Storage Write API)."""
    yield from _proxied(emulator.grpc_port, emulator.project)


def query(client: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Run a query with named parameters and return plain dict rows."""
    return run_query(client, sql, params)


def count(client: Any, table: str, dedup: bool = True) -> int:
    """Rows of `table` (a name in the audit dataset) as a reader sees them: with `dedup`,
    through the `_dedup` view's query (one row per event id), else every copy."""
    from langchain_bq_audit.views import dedup as dedup_query

    name = f"{client.project}.language_model_logging.{table}"
    source = f"({dedup_query(name)})" if dedup else f"`{name}`"
    return int(query(client, f"SELECT COUNT(*) AS n FROM {source}")[0]["n"])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def create_table_with_required_user(client: Any, table: str) -> None:
    """The audit table as made elsewhere with user_id REQUIRED: rows without a user are
    invalid there (a permanent, per-row rejection)."""
    from google.cloud import bigquery

    from langchain_bq_audit import schema

    fields = [
        bigquery.SchemaField(f.name, f.field_type,
                             mode="REQUIRED" if f.name == "user_id" else f.mode)
        for f in schema.to_schema_fields()
    ]  # fmt: skip
    client.create_dataset(f"{client.project}.language_model_logging", exists_ok=True)
    client.create_table(
        bigquery.Table(f"{client.project}.language_model_logging.{table}", schema=fields)
    )


@pytest.fixture
def read_rows(bq_client: Any, table_name: str) -> Callable[..., list[dict[str, Any]]]:
    """All rows of this test's table (optionally filtered), oldest start first."""

    def read(where: str = "TRUE", **params: Any) -> list[dict[str, Any]]:
        table = f"{bq_client.project}.language_model_logging.{table_name}"
        return query(
            bq_client, f"SELECT * FROM `{table}` WHERE {where} ORDER BY start_time", **params
        )

    return read


SETTLED = ("written", "dead_lettered", "spooled", "dropped")


def assert_accounted(stats: dict[str, Any]) -> None:
    """The accounting rule at a quiet point: every accepted row is written, dead-lettered,
    spooled, dropped or still queued, exactly once."""
    settled = sum(stats[name] for name in SETTLED)
    assert stats["accepted"] == settled + stats["queued"], stats


def accounted(handler: Any, timeout: float = 60) -> dict[str, Any]:
    """Flush `handler`, wait until nothing is queued, assert the accounting rule; its stats."""
    handler.flush(timeout)
    wait_for(lambda: handler.stats()["queued"] == 0, timeout, "the writer to go quiet")
    stats: dict[str, Any] = handler.stats()
    assert_accounted(stats)
    return stats


def delivered(handler: Any, n: int, timeout: float = 120) -> None:
    """Wait until `n` rows are in BigQuery, written or replayed, with nothing queued or
    spooled: a loaded emulator slower than a test's short deadline spools a batch, and the
    next probe replays it (probes back off to 30 s), so neither is a failure here."""

    def done() -> bool:
        s = handler.stats()
        return s["queued"] == 0 and s["spool_bytes"] == 0 and s["written"] + s["replayed"] >= n

    wait_for(done, timeout, f"{n} rows to be written or replayed")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a real tmpfs of `size` bytes (root only): a disk that really fills up and can
    really be remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and the dev machine run as root)")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                       check=True)  # fmt: skip
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, mode: str) -> None:
    """Remount a tmpfs `ro` or `rw`, as an operator (or a failing disk) would."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


TRACE = "00000000-0000-4000-8000-000000000019"


def run_traced_chain(handler: BigQueryAuditHandler) -> None:
    """`prompt | FakeListChatModel | StrOutputParser | tool` as trace `TRACE`, then a second
    trace in the same session that must not show in it."""
    from uuid import UUID

    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.tools import tool

    @tool
    def shout(text: str) -> str:
        """Say `text` loudly."""
        return text.upper() + "!"

    prompt = ChatPromptTemplate.from_messages([("human", "Tell me about {topic}")])
    chain = prompt | FakeListChatModel(responses=["cats purr", "dogs bark"]) | StrOutputParser()
    meta = {"session_id": "s-trace", "user_id": "ana"}
    for topic, run_id in (("cats", UUID(TRACE)), ("dogs", None)):
        (chain | shout).invoke({"topic": topic}, config={
            "callbacks": [handler], "metadata": meta, "run_id": run_id})  # fmt: skip
    assert handler.flush(timeout=60)
