"""The streaming-insert sink (`tabledata.insertAll`), insertId = event id."""

from __future__ import annotations

from typing import Any

from .base import PermanentError, RetryableError, TableMissingError, setup_refused

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_SETUP_STATUS = {401, 403}  # not authenticated, permission denied: spool, do not retry


class InsertAllSink:
    """Writes batches with `Client.insert_rows_json`; one request per batch, bounded time."""

    def __init__(self, client: Any, table_id: str, timeout: float) -> None:
        self._client = client
        self._table_id = table_id
        self._timeout = timeout

    def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
        from google.api_core import exceptions as gexc

        try:
            # retry=None: the writer owns retries, so their total time stays bounded.
            errors = self._client.insert_rows_json(
                self._table_id, rows, row_ids=ids, retry=None, timeout=self._timeout
            )
        except gexc.NotFound as exc:
            raise TableMissingError(str(exc)) from exc
        except gexc.GoogleAPICallError as exc:
            code = getattr(exc, "code", None)
            if code in _RETRYABLE_STATUS or code is None:
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
    """insertAll per-row errors -> {index: message}; 'stopped' rows map to '' (retry them)."""
    out: dict[int, str] = {}
    for entry in errors or ():
        reasons = entry.get("errors") or []
        real = [e for e in reasons if e.get("reason") not in ("stopped", None)]
        if real:
            out[int(entry["index"])] = "; ".join(
                f"{e.get('reason')}: {e.get('location') or ''} {e.get('message') or ''}".strip()
                for e in real
            )
        else:
            out[int(entry["index"])] = ""
    return out
