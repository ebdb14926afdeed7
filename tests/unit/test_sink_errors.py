"""How the insertAll sink tells a retry from a dead letter, against a real HTTP server that
answers as BigQuery (or the embedded local BigQuery) answered: a real client, real bytes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from langchain_bq_audit.client import make_client
from langchain_bq_audit.settings import AuditSettings
from langchain_bq_audit.sinks.base import PermanentError, RetryableError
from langchain_bq_audit.sinks.insert_all import InsertAllSink

# what local-bigquery 0.3.2 answered to an insertAll when two writers' DuckLake transactions
# collided (a suite run, writing one table's digests from two handlers)
CONFLICT = "Failed to commit: Failed to commit DuckLake transaction."


class Answers:
    """The status and JSON body the server gives every request, set by each test."""

    status = 200
    body: ClassVar[dict[str, Any]] = {}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = json.dumps(Answers.body).encode()
        self.send_response(Answers.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sink() -> Iterator[InsertAllSink]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    client = make_client(AuditSettings(emulator_host=host, project="local"))
    yield InsertAllSink(client, "local.language_model_logging.inference_logs", 5.0)
    server.shutdown()


def error(code: int, message: str, reason: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message,
                      "errors": [{"reason": reason, "message": message}]}}  # fmt: skip


def test_the_local_bigquerys_write_conflict_is_retried_not_dead_lettered(sink) -> None:
    Answers.status, Answers.body = 400, error(400, CONFLICT, "invalid")
    with pytest.raises(RetryableError, match="DuckLake"):
        sink.write([{"event_id": "e1"}], ["e1"])


def test_any_other_bad_request_is_permanent(sink) -> None:
    Answers.status, Answers.body = 400, error(400, "Invalid table name", "invalid")
    with pytest.raises(PermanentError, match="Invalid table name"):
        sink.write([{"event_id": "e1"}], ["e1"])


def test_a_row_refused_by_the_conflict_retries_the_request_and_a_bad_row_is_its_own(
    sink,
) -> None:
    Answers.status = 200
    Answers.body = {"insertErrors": [
        {"index": 0, "errors": [{"reason": "invalid", "message": CONFLICT}]},
        {"index": 1, "errors": [{"reason": "stopped", "message": ""}]},
    ]}  # fmt: skip
    with pytest.raises(RetryableError, match=r"row 0: .*DuckLake"):  # backoff and deadline
        sink.write([{"event_id": "e1"}, {"event_id": "e2"}], ["e1", "e2"])
    Answers.body = {"insertErrors": [
        {"index": 1, "errors": [{"reason": "invalid", "message": "no such field: x"}]},
        {"index": 0, "errors": [{"reason": "stopped", "message": ""}]},
    ]}  # fmt: skip
    errors = sink.write([{"event_id": "e1"}, {"event_id": "e2", "x": 1}], ["e1", "e2"])
    assert errors == {0: "", 1: "invalid:  no such field: x"}
