"""The Storage Write API sink: rows appended as Arrow to the table's `_default` stream.

One long-lived `AppendRows` call per writer, opened on first use and opened again after it
fails. A batch is split into requests of about `_REQUEST_BYTES`, all sent before the first
answer is awaited, so several are in flight; answers come back in order, one per request.

The `_default` stream has no insert-id dedup: rows of a request whose answer was lost can
be written twice when the writer retries. The `_dedup` view removes those copies (as it
does for insertAll, whose own dedup lasts about a minute).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from .arrow import arrow_schema, encode
from .base import (
    ConfigurationError,
    PermanentError,
    RetryableError,
    TableMissingError,
    is_transient_conflict,
    setup_refused,
)

_REQUEST_BYTES = 1_000_000  # Arrow bytes per request: a 5 MB batch is 5 requests in flight
_MAX_REQUEST_BYTES = 8_000_000  # the API takes at most 10 MB per request, envelope included
_MAX_IN_FLIGHT = 16
# gRPC status codes (google.rpc.Code) that say "send again later"
_RETRYABLE_CODES = {1, 2, 4, 8, 10, 13, 14}  # CANCELLED UNKNOWN DEADLINE RESOURCE ABORTED ...
_NOT_FOUND = 5
_SETUP_CODES = {7, 16}  # PERMISSION_DENIED, UNAUTHENTICATED: spool, do not retry
_END = object()


class _Closed(Exception):
    """The call ended (the server closed it, or it failed) with requests unanswered."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class _AppendCall:
    """One open `AppendRows` call: requests go in through a queue, answers come out in order."""

    def __init__(self, client: Any, stream_name: str) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.first = True  # the first request of a call carries the stream name and schema
        metadata = (("x-goog-request-params", f"write_stream={stream_name}"),)
        # The transport's raw stub, not the client method: that one waits for the first
        # answer before it returns. No deadline: the call lives as long as the writer, and
        # each answer is awaited with the writer's request timeout instead.
        self._call = client.transport.append_rows(iter(self._requests.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="bq-audit-append-rows", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self.answers.put(answer)
            self.answers.put(_Closed(None, "the server closed the AppendRows call"))
        except Exception as exc:  # grpc.RpcError: the call failed
            self.answers.put(_closed(exc))

    def send(self, request: Any) -> None:
        self._requests.put(request)
        self.first = False

    def close(self) -> None:
        self._requests.put(_END)
        with contextlib.suppress(Exception):
            self._call.cancel()


class WriteApiSink:
    """Writes batches through the Storage Write API; bounded time per batch."""

    def __init__(
        self, client: Any, table_id: str, timeout: float, grpc_target: str | None = None
    ) -> None:
        project, dataset, table = table_id.split(".")
        self._bq = client
        self._timeout = timeout
        self._grpc_target = grpc_target
        self._stream_name = f"projects/{project}/datasets/{dataset}/tables/{table}/streams/_default"
        self._client: Any = None
        self._call: _AppendCall | None = None
        self._schema_bytes: bytes | None = None

    def _open(self) -> _AppendCall:
        if self._call is None:
            if self._client is None:
                self._client = _write_client(self._bq, self._grpc_target)
            self._call = _AppendCall(self._client, self._stream_name)
        return self._call

    def close(self) -> None:
        """End the open call and drop the connection; the next write makes both anew.

        After a timeout the TCP connection itself may be the dead part (a hung peer, a
        stalled middlebox), and gRPC would carry every later call over it.
        """
        call, self._call = self._call, None
        client, self._client = self._client, None
        if call is not None:
            call.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.transport.close()

    def _requests(self, batch: Any, call: _AppendCall) -> list[tuple[int, int, Any]]:
        """`(start, length, request)` for slices of `batch` of about `_REQUEST_BYTES`."""
        from google.cloud.bigquery_storage_v1 import types

        if self._schema_bytes is None:
            self._schema_bytes = arrow_schema().serialize().to_pybytes()
        parts = max(1, min(_MAX_IN_FLIGHT, -(-batch.nbytes // _REQUEST_BYTES)))
        parts = min(max(parts, -(-batch.nbytes // _MAX_REQUEST_BYTES)), batch.num_rows)
        step = -(-batch.num_rows // parts)
        out: list[tuple[int, int, Any]] = []
        for start in range(0, batch.num_rows, step):
            part = batch.slice(start, step)
            arrow = types.AppendRowsRequest.ArrowData(
                rows=types.ArrowRecordBatch(
                    serialized_record_batch=part.serialize().to_pybytes(),
                    row_count=part.num_rows,
                )
            )
            request = types.AppendRowsRequest(arrow_rows=arrow)
            if call.first and not out:
                request.write_stream = self._stream_name
                request.arrow_rows.writer_schema = types.ArrowSchema(
                    serialized_schema=self._schema_bytes
                )
            out.append((start, part.num_rows, request))
        return out

    def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
        batch, kept, errors = encode(rows)
        if not kept:
            return errors
        deadline = time.monotonic() + self._timeout
        try:
            call = self._open()
            requests = self._requests(batch, call)
            for _, _, request in requests:
                call.send(request)
        except Exception as exc:
            self.close()
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc

        written = 0
        failure: Exception | None = None  # once set, later requests are not awaited
        for start, length, _ in requests:
            indexes = kept[start : start + length]
            outcome = failure or _outcome(call, deadline, self._timeout, indexes, errors)
            if outcome is None:
                written += length
            elif isinstance(outcome, RetryableError | TableMissingError | ConfigurationError):
                failure = outcome
                errors.update(dict.fromkeys(indexes, ""))  # not written: send again
            elif isinstance(outcome, PermanentError):
                errors.update(dict.fromkeys(indexes, f"rejected: {outcome}"))
            # _RowsRejected: `errors` already says which rows were invalid
        if failure is not None:
            self.close()  # a call with unanswered requests cannot be trusted further
            if not written and not any(errors.values()):
                raise failure
        return errors


def _outcome(
    call: _AppendCall, deadline: float, timeout: float, indexes: list[int], errors: dict[int, str]
) -> Exception | None:
    """Await the next answer: None when its rows were written, else why not."""
    try:
        answer = call.answers.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return RetryableError(f"no answer from the Storage Write API within {timeout} s")
    if isinstance(answer, _Closed):
        return _failure(answer.code, str(answer))
    return _answer(answer, indexes, errors)


def _closed(exc: BaseException) -> _Closed:
    """A failed call's status code number and one line of details (not gRPC's repr)."""
    call: Any = exc  # a grpc.RpcError is also a grpc.Call: code() and details()
    code = call.code() if callable(getattr(call, "code", None)) else None
    value = getattr(code, "value", None)
    number = value[0] if isinstance(value, tuple) else None
    details = call.details() if callable(getattr(call, "details", None)) else str(exc)
    return _Closed(number, f"AppendRows {getattr(code, 'name', type(exc).__name__)}: {details}")


def _failure(code: int | None, message: str) -> Exception:
    if code == _NOT_FOUND:
        return TableMissingError(message)
    if code in _SETUP_CODES:
        return setup_refused(code, message)
    if code is None or code in _RETRYABLE_CODES or is_transient_conflict(message):
        return RetryableError(message)
    return PermanentError(message)


def _answer(answer: Any, indexes: list[int], errors: dict[int, str]) -> Exception | None:
    """None when the request's rows were written; else why not (row errors go to `errors`)."""
    code = answer.error.code
    if not code:
        return None
    message = f"code {code}: {answer.error.message}"
    if answer.row_errors:
        # the request was rejected as a whole: the named rows are invalid, the rest retry
        for row_error in answer.row_errors:
            if 0 <= row_error.index < len(indexes):
                errors[indexes[row_error.index]] = f"invalid: {row_error.message}"
        for i in indexes:
            errors.setdefault(i, "")
        return _RowsRejected(message)
    return _failure(code, message)


class _RowsRejected(Exception):
    """Some rows of the request were invalid; the errors map already says which."""


def _write_client(bq_client: Any, grpc_target: str | None) -> Any:
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient

    if grpc_target:  # a local emulator: plain gRPC, no credentials
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
            BigQueryWriteGrpcTransport,
        )

        transport = BigQueryWriteGrpcTransport(channel=grpc.insecure_channel(grpc_target))
        return BigQueryWriteClient(transport=transport)  # type: ignore[no-untyped-call]
    credentials = getattr(bq_client, "_credentials", None)  # the REST client's, same auth
    return BigQueryWriteClient(credentials=credentials)  # type: ignore[no-untyped-call]
