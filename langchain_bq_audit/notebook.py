"""A small helper for notebooks: a BigQuery to try things on, rows as DataFrames, and
plots of one trace and of usage over time.

Needs the `notebook` extra (pandas, matplotlib). Nothing in the handler depends on this module.

    from langchain_bq_audit import notebook
    nb = notebook.start()        # the embedded BigQuery, unless a Google Cloud project is set
    handler = nb.handler()       # a BigQueryAuditHandler writing there
    chain.invoke(question, config={"callbacks": [handler]})
    nb.recent(20)                # the latest rows of this run as a pandas DataFrame
    notebook.plot_trace(nb.trace(trace_id))   # one trace as a timeline (matplotlib)
    notebook.plot_usage(nb.recent(100))       # tokens and cost over time
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
from .reading import recent_rows, run_query, trace_rows
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

    def trace(self, id_: str) -> Any:
        """The runs of one trace (`reading.TRACE_COLUMNS`) as a DataFrame in tree order (a
        run after its parent, siblings by start) with each run's `depth` (0: a root);
        `id_` is a trace id, or a run id or event id of the trace. Empty when none matches."""
        from .traces import tree

        order = tree(trace_rows(self.client, self.table_id, id_))
        return _frame([{**row, "depth": depth} for depth, row in order])

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


def plot_trace(trace: Any, ax: Any = None) -> Any:
    """One trace as a Gantt-style timeline: a bar per run (a row of `trace`, a frame from
    `AuditNotebook.trace`) from its start to its end, in ms since the trace started, top to
    bottom in tree order, labelled by name indented by depth; failed runs red, model calls
    blue. Draws on `ax` (a new figure when None) and returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from .traces import INDENT, MODEL_RUN_TYPES

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 1 + 0.35 * len(trace)))
    if len(trace) == 0:  # no row has that id (an empty frame has no columns either)
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("Trace (no runs)")
        return ax
    start = pd.to_datetime(trace["start_time"], utc=True).fillna(
        pd.to_datetime(trace["timestamp"], utc=True)
    )  # start_time is NULL on rows of old writers: a bar of no length at the end
    end = pd.to_datetime(trace["timestamp"], utc=True)
    left = (start - start.min()).dt.total_seconds() * 1000
    width = (end - start).dt.total_seconds() * 1000
    colors = [
        "tab:red" if status == "error" else "tab:blue" if kind in MODEL_RUN_TYPES else "tab:gray"
        for status, kind in zip(trace["status"], trace["run_type"], strict=True)
    ]
    ax.barh(range(len(trace)), width, left=left, color=colors, height=0.6)
    # monospace, padded to one width: right-aligned tick labels then line up on the left
    labels = [INDENT * int(d) + str(n) for d, n in zip(trace["depth"], trace["name"], strict=True)]
    longest = max(map(len, labels), default=0)
    ax.set_yticks(range(len(trace)), [x.ljust(longest) for x in labels], family="monospace")
    ax.invert_yaxis()  # the root on top
    ax.set_xlabel("ms since the trace started")
    trace_id = trace["trace_id"].iloc[0] if len(trace) else ""
    ax.set_title(f"Trace {trace_id}")
    ax.figure.tight_layout()
    return ax


def plot_usage(rows: Any, axes: Any = None) -> Any:
    """Tokens and cost over time: the running totals of `total_tokens` and `cost_usd` of the
    model calls among `rows` (a frame of `AuditNotebook.recent` or `query` with `timestamp`,
    `run_type`, `total_tokens`, `cost_usd`), by when each call ended. A call without a
    price adds nothing to the cost line, which says so when no call has one. Draws on two
    `axes` (a new figure when None) and returns them (tokens, cost)."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import pandas as pd

    from .traces import MODEL_RUN_TYPES

    if axes is None:
        _, axes = plt.subplots(2, 1, sharex=True, figsize=(9, 4.5))
    tokens_ax, cost_ax = axes
    if len(rows) == 0:  # an empty frame has no columns: nothing to draw, and say so
        rows = pd.DataFrame(columns=["timestamp", "run_type", "total_tokens", "cost_usd"])
    calls = rows[rows["run_type"].isin(MODEL_RUN_TYPES)].sort_values("timestamp")
    when = pd.to_datetime(calls["timestamp"], utc=True)
    tokens = pd.to_numeric(calls["total_tokens"]).fillna(0).cumsum()
    cost = pd.to_numeric(calls["cost_usd"]) if "cost_usd" in calls else pd.Series(dtype=float)
    tokens_ax.step(when, tokens, where="post", marker=".")
    tokens_ax.set_ylabel("tokens (running total)")
    tokens_ax.set_title("Model calls: tokens and cost over time")
    if cost.notna().any():
        cost_ax.step(when, cost.fillna(0).cumsum(), where="post", marker=".", color="tab:green")
    else:
        cost_ax.text(0.5, 0.5, "no call has a price (cost_usd is NULL: model not priced)",
                     ha="center", va="center", transform=cost_ax.transAxes)  # fmt: skip
    cost_ax.set_ylabel("USD (running total)")
    cost_ax.set_xlabel("when the call ended (UTC)")
    locator = cost_ax.xaxis.get_major_locator()
    cost_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    cost_ax.figure.tight_layout()
    return tokens_ax, cost_ax
