"""The streaming-insert sink (`tabledata.insertAll`), insertId = event id."""

from __future__ import annotations

from typing import Any

from ..jsoncodec import compact_json
from .base import (
    PermanentError,
    RetryableError,
    TableMissingError,
    is_transient_conflict,
    setup_refused,
)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_SETUP_STATUS = {401, 403}  # not authenticated, permission denied: spool, do not retry


def request_body(rows: list[dict[str, Any]], ids: list[str]) -> bytes:
    """The insertAll request body of `rows`, with insert ids `ids`, as UTF-8 JSON: what
    `Client.insert_rows_json` sends, encoded in one pass by orjson when it is installed."""
    body = [{"insertId": i, "json": r} for r, i in zip(rows, ids, strict=True)]
    return compact_json({"rows": body})


class InsertAllSink:
    """Writes batches to `tabledata.insertAll`; one request per batch, bounded time.

    The body is encoded here (`request_body`) and posted through the client's own API call
    (its credentials, endpoint, retry-free timeout and tracing span): `insert_rows_json`
    would rebuild each row's dict and encode it with `json`, 5x slower. A client without
    that method (not a `google.cloud.bigquery.Client`) gets `insert_rows_json`.
    """

    def __init__(self, client: Any, table_id: str, timeout: float) -> None:
        self._client = client
        self._table_id = table_id
        self._timeout = timeout
        self._path: str | None = None
        if callable(getattr(client, "_call_api", None)):
            from google.cloud.bigquery import TableReference

            ref = TableReference.from_string(table_id, default_project=client.project)
            self._path = f"{ref.path}/insertAll"

    def _insert(self, rows: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
        """insertAll's per-row errors, as `insert_rows_json` gives them."""
        if self._path is None:
            # retry=None: the writer owns retries, so their total time stays bounded.
            errors: list[dict[str, Any]] = self._client.insert_rows_json(
                self._table_id, rows, row_ids=ids, retry=None, timeout=self._timeout
            )
            return errors
        response = self._client._call_api(
            None,  # no retry: as above
            span_name="BigQuery.insertRowsJson",
            span_attributes={"path": self._path},
            method="POST",
            path=self._path,
            data=request_body(rows, ids),
            content_type="application/json",
            timeout=self._timeout,
        )
        return list(response.get("insertErrors", ()))

    def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
        from google.api_core import exceptions as gexc

        try:
            errors = self._insert(rows, ids)
        except gexc.NotFound as exc:
            raise TableMissingError(str(exc)) from exc
        except gexc.GoogleAPICallError as exc:
            code = getattr(exc, "code", None)
            if code in _RETRYABLE_STATUS or code is None or is_transient_conflict(str(exc)):
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
            if code in _SETUP_STATUS:
                raise setup_refused(code, f"{type(exc).__name__}: {exc}") from exc
            raise PermanentError(f"{type(exc).__name__}: {exc}") from exc
        except (OSError, ValueError) as exc:
            # requests' ConnectionError/Timeout are OSErrors; a torn response is a ValueError.
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("requests", "urllib3", "http")):
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
            raise
        return _row_errors(errors)


def _row_errors(errors: list[dict[str, Any]]) -> dict[int, str]:
    """insertAll per-row errors -> {index: message}; 'stopped' rows map to '' (retry them).
    A row refused by the local BigQuery's write conflict makes the whole request a retry
    (`RetryableError`: with the batch's backoff and deadline; ids dedup the rows it wrote)."""
    out: dict[int, str] = {}
    for entry in errors or ():
        reasons = entry.get("errors") or []
        for e in reasons:
            if is_transient_conflict(str(e.get("message") or "")):
                raise RetryableError(f"row {entry.get('index')}: {e.get('message')}")
        real = [e for e in reasons if e.get("reason") not in ("stopped", None)]
        if real:
            out[int(entry["index"])] = "; ".join(
                f"{e.get('reason')}: {e.get('location') or ''} {e.get('message') or ''}".strip()
                for e in real
            )
        else:
            out[int(entry["index"])] = ""
    return out
