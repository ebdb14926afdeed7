"""The sink interface the writer uses, and the two kinds of failure it tells apart."""

from __future__ import annotations

from typing import Any, Protocol


class RetryableError(Exception):
    """The request may succeed if sent again: connection lost, timeout, 5xx, 429."""


class PermanentError(Exception):
    """Sending the same request again will fail the same way (4xx other than 429/404)."""


class ConfigurationError(Exception):
    """Sending again will not help until the setup changes: missing credentials, permission
    denied, an unknown project. Rows are spooled for later, not dead-lettered."""


IAM_HINT = "check the project, and the caller's IAM roles on the dataset (bigquery.dataEditor)"


def setup_refused(code: int | None, detail: str) -> ConfigurationError:
    """The error for an answer that says: not authenticated (401) or permission denied."""
    what = "not authenticated" if code in (401, 16) else "permission denied"
    return ConfigurationError(f"{what} ({detail}); {IAM_HINT}")


# What local-bigquery answers (HTTP 400 / gRPC INVALID_ARGUMENT) when two writers' DuckLake
# transactions collide: a conflict that the next attempt resolves, not a bad request. Real
# BigQuery never says it, so only the embedded emulator's answers are affected.
_TRANSIENT_CONFLICTS = ("Failed to commit DuckLake transaction",)


def is_transient_conflict(message: str) -> bool:
    """True when a request refused as bad is in fact the local BigQuery's write conflict
    (retry it; dead-lettering would keep good rows out of the table)."""
    return any(text in message for text in _TRANSIENT_CONFLICTS)


class TableMissingError(Exception):
    """The destination table (or dataset) does not exist."""


class Sink(Protocol):
    """Writes one batch. Rows rejected one by one are returned; whole-request failures raise."""

    def write(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[int, str]:
        """Write `rows` with insert ids `ids`.

        Returns `{index: error}` for rows the backend rejected as invalid (all other rows
        were written). Raises `RetryableError`, `PermanentError`, `ConfigurationError` or
        `TableMissingError`
        when the request as a whole failed (then no row was written).
        """
        ...
