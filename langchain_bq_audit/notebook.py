"""A small helper for notebooks: a BigQuery to try things on, and rows as DataFrames.

Needs the `notebook` extra (pandas). Nothing in the handler depends on this module.

    from langchain_bq_audit import notebook
    nb = notebook.start()        # the embedded BigQuery, unless a Google Cloud project is set
    handler = nb.handler()       # a BigQueryAuditHandler writing there
    chain.invoke(question, config={"callbacks": [handler]})
    nb.recent(20)                # the latest rows of this run as a pandas DataFrame
    nb.close()                   # write what is queued, stop the embedded BigQuery
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from .client import make_client
from .emulator import LocalBigQuery
from .handler import BigQueryAuditHandler
from .provision import table_id
from .reading import recent_rows, run_query
from .registry import flush_all, shutdown
from .settings import AuditSettings

_current: AuditNotebook | None = None


class AuditNotebook:
    """A client for the audit table, and the embedded BigQuery when this started one."""

    def __init__(self, settings: AuditSettings, client: Any,
                 emulator: LocalBigQuery | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.client = client
        self.emulator = emulator
        self.table_id = table_id(client, settings)
        self.closed = False
        # the embedded BigQuery keeps its data between runs: reads default to this run's rows
        self.started = dt.datetime.now(dt.timezone.utc)

    def __repr__(self) -> str:
        where = f"embedded BigQuery on {self.emulator.endpoint}" if self.emulator else "BigQuery"
        return f"<AuditNotebook {self.table_id} ({where})>"

    def handler(self, **options: Any) -> BigQueryAuditHandler:
        """A handler writing to this notebook's table (options as for the handler)."""
        options.setdefault("batch_age_s", 0.2)  # rows show up quickly while you explore
        return BigQueryAuditHandler(client=self.client, settings=self.settings, **options)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row handed to any handler so far is written."""
        return flush_all(timeout)

    def recent(self, n: int = 20, session: str | None = None, user: str | None = None,
               history: bool = False) -> Any:  # fmt: skip
        """The latest `n` rows (every column), oldest first, as a DataFrame: of this run
        (ended since `start()`), or of the whole table with `history=True`."""
        after = None if history else self.started
        return _frame(recent_rows(self.client, self.table_id, n, session, user, after, None))

    def query(self, sql: str, **params: Any) -> Any:
        """A query as a DataFrame; `{table}` in `sql` is the audit table's full id, `@name`
        parameters come from `params`, and `@started` is when this run started. Example:
        `nb.query("SELECT * FROM `{table}_dedup` WHERE timestamp >= @started")`."""
        if "@started" in sql:
            params.setdefault("started", self.started)
        return _frame(run_query(self.client, sql.replace("{table}", self.table_id), params))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`), then stop the embedded BigQuery."""
        global _current
        shutdown(timeout)
        if self.emulator is not None:
            self.emulator.stop()
        self.closed = True
        if _current is self:
            _current = None


def _frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def start(project: str | None = None, data_dir: str | Path | None = None,
          **options: Any) -> AuditNotebook:  # fmt: skip
    """Start (or reuse) what the notebook writes to and reads from.

    A running local BigQuery (`BIGQUERY_EMULATOR_HOST`) is reused; a configured Google
    Cloud project (`project=`, `BQ_AUDIT_PROJECT`, `GOOGLE_CLOUD_PROJECT`) is used for
    real; otherwise the embedded BigQuery starts, keeping its data in `data_dir`.
    """
    global _current
    if _current is not None and not _current.closed:
        return _current
    settings = AuditSettings.from_env(project=project, **options)
    emulator = None
    real_project = settings.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if settings.emulator_endpoint or real_project:
        client = make_client(settings)
    else:
        emulator = LocalBigQuery(data_dir).start()
        client = emulator.client()
    _current = AuditNotebook(settings, client, emulator)
    return _current
