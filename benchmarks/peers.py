"""The peers side by side in one run: what each handler costs a quick chain call.

    .venv/bin/pip install -e '.[bench]'          # the peers: benchmark-only dependencies
    .venv/bin/python -m benchmarks.peers         # about 5-10 minutes on 2 cores

The chain is `ChatPromptTemplate | FakeListChatModel | StrOutputParser` with a small prompt,
called with `invoke` and `ainvoke`. Variants: a no-op `run_inline` handler (the baseline),
this project's handler with its default settings and with `writer_process=True`, Langfuse's
`CallbackHandler` and LangSmith's `LangChainTracer` (each really serializing and sending to a
dummy HTTP endpoint in a child process, so its server work is not charged to the caller), and
langchain-google-community's `BigQueryCallbackHandler` writing to the embedded BigQuery. A
peer that is not installed is reported and skipped.

Unflattering by design: every variant is warmed up and drained before the first round; the
order of the variants rotates every round; each block of calls ends with the variant's
backlog counted (rows or runs not yet sent, where the handler tells) and its drain timed, so
work left for later is reported instead of hidden; the writer process is not pinned apart
(it shares the benchmark's CPU, as in an app that has no spare core). Figures are per-round
ratios to the no-op block of the same round; the table shows their median, and `--verbose`
prints every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from benchmarks.run import Noop, pct, pin_apart, timed_calls
from langchain_bq_audit import BigQueryAuditHandler
from langchain_bq_audit.emulator import LocalBigQuery, free_port

PEER_DATASET = "peers"

# The dummy endpoint. Each peer's client gets an answer of the shape it parses: LangSmith
# `GET /info` (its batch ingestion settings) and 202 for runs, Langfuse 200 with an empty
# OTLP protobuf for spans and 207 for its ingestion API, an OAuth token for the fake
# Application Default Credentials of the Google peers. It counts requests and bytes per path.
DUMMY_SERVER = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen, lock = {}, threading.Lock()
INFO = {"version": "0.10.0", "instance_flags": {}, "batch_ingest_config": {
    "use_multipart_endpoint": True, "scale_up_qsize_trigger": 1000,
    "scale_up_nthreads_limit": 16, "scale_down_nempty_trigger": 4, "size_limit": 100,
    "size_limit_bytes": 20971520}}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def count(self, size):
        path = self.path.split("?")[0]
        with lock:
            n, b = seen.get(path, (0, 0))
            seen[path] = (n + 1, b + size)

    def do_GET(self):
        if self.path == "/_stats":
            with lock:
                return self.answer(200, json.dumps(seen).encode())
        self.count(0)
        if self.path.startswith("/info"):
            return self.answer(200, json.dumps(INFO).encode())
        self.answer(200, b"{}")

    def do_POST(self):
        size = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(size)
        self.count(size)
        if self.path.startswith("/token"):
            token = {"access_token": "dummy", "expires_in": 3600, "token_type": "Bearer"}
            return self.answer(200, json.dumps(token).encode())
        if "/otel/" in self.path:
            return self.answer(200, b"", "application/x-protobuf")
        if self.path.startswith("/api/public/ingestion"):
            return self.answer(207, b'{"successes": [], "errors": []}')
        if self.path.startswith("/runs"):
            return self.answer(202, b"{}")
        self.answer(200, b"{}")

    do_PATCH = do_PUT = do_POST

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class DummyEndpoint:
    """The dummy HTTP server in a child process, on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", DUMMY_SERVER, str(self.port)])
        deadline = time.monotonic() + 30
        while True:
            try:
                self.received()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def received(self) -> dict[str, tuple[int, int]]:
        """Requests and bytes received per path so far."""
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=5) as answer:
            return {k: (v[0], v[1]) for k, v in json.loads(answer.read()).items()}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def fake_adc(token_url: str) -> None:
    """Application Default Credentials for the Google peers, which take no credentials of
    their own: a service account with a fresh key whose token endpoint is the dummy server
    (an `authorized_user` file would not do: google-auth always sends those to Google)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(prefix="bq-audit-peers-adc-"), "adc.json")
    with open(path, "w") as f:
        json.dump({"type": "service_account", "project_id": "local", "private_key_id": "bench",
                   "private_key": pem, "client_email": "bench@local.iam.gserviceaccount.com",
                   "client_id": "1", "token_uri": token_url}, f)  # fmt: skip
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = path


def google_community_handler(
    rest: str, grpc_target: str, project: str, token_url: str, table: str, **config: Any
) -> Any:
    """langchain-google-community's `BigQueryCallbackHandler` writing to the emulator.

    Its REST client follows `BIGQUERY_EMULATOR_HOST`; its Storage Write client has no
    endpoint option, so once the handler has set itself up (on its first event) the client
    its batch writer holds is replaced by one on the emulator's gRPC port, and its stream
    name `.../tables/T/_default` (which BigQuery accepts) is given the documented spelling
    `.../tables/T/streams/_default`, the only one the emulator knows. Everything else
    (callbacks, row building, Arrow encoding, batching, the write path) is the peer's own.
    Raises ImportError when the package is not installed.
    """
    import grpc
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
    from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
        BigQueryWriteGrpcTransport,
    )
    from langchain_google_community.callbacks.bigquery_callback import (
        BigQueryCallbackHandler,
        BigQueryLoggerConfig,
    )

    os.environ["BIGQUERY_EMULATOR_HOST"] = rest
    fake_adc(token_url)

    class OnEmulator(BigQueryCallbackHandler):  # type: ignore[misc]
        def _ensure_started(self) -> None:
            if self._started:
                return
            super()._ensure_started()
            transport = BigQueryWriteGrpcTransport(channel=grpc.insecure_channel(grpc_target))
            self.write_client = BigQueryWriteClient(transport=transport)  # type: ignore[no-untyped-call]
            self.batch_processor.write_client = self.write_client
            stream = self.batch_processor.write_stream
            if not stream.endswith("/streams/_default"):
                self.batch_processor.write_stream = stream.removesuffix("_default") + (
                    "streams/_default"
                )

    # Its defaults but `config` and one: the analytics views are skipped because the
    # emulator's SQL does not take their DDL (made once, at set-up, not per call).
    options = {"create_views": False, **config}
    return OnEmulator(project_id=project, dataset_id=PEER_DATASET, table_id=table,
                      config=BigQueryLoggerConfig(**options))  # fmt: skip


@dataclass
class Variant:
    """A handler under test, how to drain it, and how to read its backlog (None: unknown)."""

    name: str
    handler: Any
    drain: Callable[[], None] = lambda: None
    backlog: Callable[[], int | None] = lambda: None
    close: Callable[[], object] = lambda: None
    table: str | None = None  # dataset.table it writes, to count its rows at the end
    times: dict[str, list[list[float]]] = field(default_factory=dict)
    drains: dict[str, list[float]] = field(default_factory=dict)
    backlogs: dict[str, list[int | None]] = field(default_factory=dict)


def ours(bq: LocalBigQuery, table: str, **options: Any) -> Variant:
    handler = BigQueryAuditHandler(table=table, emulator_host=bq.endpoint, project=bq.project,
                                   **options)  # fmt: skip

    def drain() -> None:
        assert handler.flush(300), handler.stats()

    return Variant(table, handler, drain, lambda: int(handler.stats()["queued"]), handler.close,
                   f"{handler.settings.dataset}.{table}")  # fmt: skip


def langfuse_variant(endpoint: DummyEndpoint) -> Variant:
    from langfuse import Langfuse
    from langfuse.langchain import CallbackHandler

    client = Langfuse(public_key="pk-lf-bench", secret_key="sk-lf-bench", base_url=endpoint.url)
    return Variant("Langfuse CallbackHandler", CallbackHandler(public_key="pk-lf-bench"),
                   client.flush, close=client.shutdown)  # fmt: skip


def langsmith_variant(endpoint: DummyEndpoint) -> Variant:
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    client = Client(api_url=endpoint.url, api_key="lsv2-bench")
    tracer = LangChainTracer(client=client, project_name="bench")

    def drain() -> None:
        tracer.wait_for_futures()
        client.flush()

    def backlog() -> int | None:
        queue = getattr(client, "tracing_queue", None)
        return queue.qsize() if queue is not None else None

    return Variant("LangSmith LangChainTracer", tracer, drain, backlog)


def google_variant(bq: LocalBigQuery, endpoint: DummyEndpoint) -> Variant:
    bq.client().create_dataset(PEER_DATASET, exists_ok=True)
    # Rows 100 to a request: its default, 1, sends one request a row (8 a call), and a block
    # of 200 calls then takes minutes to drain here (benchmarks/peers_rows.py measures it).
    handler = google_community_handler(
        bq.endpoint,
        bq.grpc_target,
        bq.project,
        f"{endpoint.url}/token",
        "peers_bench",
        batch_size=100,
    )

    def drain() -> None:
        handler.flush(timeout=300)

    def backlog() -> int | None:
        processor = handler.batch_processor
        return processor._queue.qsize() if processor is not None else None

    return Variant("langchain-google-community BigQueryCallbackHandler", handler, drain,
                   backlog, handler.shutdown, f"{PEER_DATASET}.peers_bench")  # fmt: skip


def variants(bq: LocalBigQuery, endpoint: DummyEndpoint) -> tuple[list[Variant], list[str]]:
    """Every variant that can run here, and a line for each that cannot."""
    out = [Variant("no-op", Noop()),
           ours(bq, "peers_default"),
           ours(bq, "peers_process", writer_process=True)]  # fmt: skip
    out[1].name, out[2].name = "this handler, default", "this handler, writer_process=True"
    skipped = []
    makers: list[tuple[str, Callable[[], Variant]]] = [
        ("langfuse", lambda: langfuse_variant(endpoint)),
        ("langsmith", lambda: langsmith_variant(endpoint)),
        ("langchain-google-community[bigquery]", lambda: google_variant(bq, endpoint)),
    ]
    for package, make in makers:
        try:
            out.append(make())
        except ImportError as e:
            skipped.append(f"skipped: {package} is not installed ({e}); "
                           "pip install -e '.[bench]'")  # fmt: skip
    return out, skipped


def block(variant: Variant, chain: Any, mode: str, calls: int) -> None:
    """One timed block, then its backlog counted and its drain timed."""
    variant.times.setdefault(mode, []).append(timed_calls(chain, {"q": "hi"}, variant.handler,
                                                          calls, mode))  # fmt: skip
    variant.backlogs.setdefault(mode, []).append(variant.backlog())
    start = time.perf_counter()
    variant.drain()
    variant.drains.setdefault(mode, []).append(time.perf_counter() - start)


def ratio_rows(vs: list[Variant], mode: str, verbose: bool) -> list[str]:
    base = vs[0].times[mode]
    lines = [f"{mode}: no-op p50 {statistics.median(pct(t, .5) for t in base) * 1e6:.0f} us, "
             f"mean {statistics.median(statistics.mean(t) for t in base) * 1e6:.0f} us, "
             f"p99 {statistics.median(pct(t, .99) for t in base) * 1e6:.0f} us "
             f"(medians of {len(base)} rounds)"]  # fmt: skip
    for v in vs[1:]:
        blocks = zip(v.times[mode], base, v.drains[mode], strict=True)
        per_round = [(pct(t, .5) / pct(n, .5), statistics.mean(t) / statistics.mean(n),
                      pct(t, .99) / pct(n, .99), (sum(t) + d) / sum(n))
                     for t, n, d in blocks]  # fmt: skip
        p50, mean, p99, e2e = (statistics.median(r[i] for r in per_round) for i in range(4))
        drain_ms = statistics.median(v.drains[mode]) * 1e3
        known = [b for b in v.backlogs[mode] if b is not None]
        backlog = f"{statistics.median(known):.0f} (max {max(known)})" if known else "n/a"
        lines.append(f"  {v.name:<52} p50 {p50:5.2f}x  mean {mean:5.2f}x  p99 {p99:5.2f}x | "
                     f"backlog {backlog}, drain {drain_ms:.0f} ms, calls + drain "
                     f"{e2e:.2f}x")  # fmt: skip
        if verbose:
            for i, r in enumerate(per_round):
                lines.append(f"      round {i + 1}: p50 {r[0]:.2f}x mean {r[1]:.2f}x p99 "
                             f"{r[2]:.2f}x, backlog {v.backlogs[mode][i]}, drain "
                             f"{v.drains[mode][i] * 1e3:.0f} ms")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--verbose", action="store_true", help="print every round")
    args = parser.parse_args()
    os.environ["BQ_AUDIT_SPOOL_DIR"] = tempfile.mkdtemp(prefix="bq-audit-peers-spool-")
    chain = (ChatPromptTemplate.from_messages([("human", "{q}")])
             | FakeListChatModel(responses=["ok"]) | StrOutputParser())  # fmt: skip
    endpoint = DummyEndpoint()
    try:
        with LocalBigQuery(tempfile.mkdtemp(prefix="bq-audit-peers-")) as bq:
            assert bq.pid is not None
            cpus = pin_apart(bq.pid)  # the emulator and the dummy endpoint: remote in real life
            if "not pinned" not in cpus:
                os.sched_setaffinity(endpoint.proc.pid, os.sched_getaffinity(bq.pid))
            vs, skipped = variants(bq, endpoint)
            for mode in ("invoke", "ainvoke"):
                for v in vs:  # warm up, and settle the warm-up before the first round
                    timed_calls(chain, {"q": "hi"}, v.handler, args.per_round // 2, mode)
                    v.drain()
                for r in range(args.rounds):
                    for v in vs[r % len(vs) :] + vs[: r % len(vs)]:  # rotate the order
                        block(v, chain, mode, args.per_round)
            received = endpoint.received()
            count = "SELECT COUNT(*) FROM `{}.{}`"
            rows = {v.table: next(iter(bq.client().query(count.format(bq.project, v.table))))[0]
                    for v in vs if v.table}  # fmt: skip
            for v in vs:
                v.close()
    finally:
        endpoint.close()
    load = os.getloadavg()
    print(f"peers benchmark (Python {sys.version.split()[0]}, {os.cpu_count()} cores, load "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; {cpus}; {args.rounds} rounds x "
          f"{args.per_round} calls, order rotated per round; ratios are medians over rounds "
          f"of per-round ratios to the no-op block)")  # fmt: skip
    for line in skipped:
        print(line)
    for mode in ("invoke", "ainvoke"):
        print("\n".join(ratio_rows(vs, mode, args.verbose)))
    print("dummy endpoint received (requests, bytes): " + ", ".join(
        f"{path} {n} / {size:,}" for path, (n, size) in sorted(received.items())))  # fmt: skip
    print("rows in the emulator: " + ", ".join(f"{t} {n}" for t, n in rows.items()))


if __name__ == "__main__":
    main()
