"""The quickstart notebook runs headless, end to end, on its own embedded BigQuery."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import nbformat
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from nbclient import NotebookClient

from langchain_bq_audit import notebook
from langchain_bq_audit.settings import AuditSettings

from .conftest import TRACE, run_traced_chain

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def pixels(png: bytes, colour: str) -> int:
    """How many pixels of the PNG image `png` are `colour` (a matplotlib colour name): an
    empty figure has none of the colours matplotlib fills bars and draws lines with."""
    import io

    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    image = imread(io.BytesIO(png), format="png")[..., :3]
    return int((np.abs(image - to_rgb(colour)).max(axis=-1) < 0.02).sum())


def run_notebook(tmp_path: Path) -> tuple[str, list[Any], list[str]]:
    """(stream text, rich outputs, plain-text tables) of one headless run of the notebook."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    data = [o.data for o in outputs if o.output_type in ("execute_result", "display_data")]
    tables = [d["text/plain"] for d in data if "text/html" in d]
    return text, data, tables


@pytest.mark.usefixtures("writer_makes_views")  # the notebook reads `_dedup`
def test_quickstart_notebook_runs_and_shows_its_tables_and_plots(tmp_path, monkeypatch) -> None:
    # no project and no running emulator configured: the notebook starts its own
    for var in ("BIGQUERY_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "BQ_AUDIT_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BQ_AUDIT_EMULATOR_DATA_DIR", str(tmp_path / "bq"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    text, data, tables = run_notebook(tmp_path)

    assert "streamed: Answer number 9." in text
    assert "failed as expected: the tool is down" in text
    # latency histogram, tokens per user, one trace's timeline, tokens and cost over time
    pngs = [base64.b64decode(d["image/png"]) for d in data if "image/png" in d]
    assert len(pngs) == 4
    for i, png in enumerate(pngs):  # what a person sees, as files of this test run
        (tmp_path / f"figure-{i}.png").write_bytes(png)
        assert png.startswith(b"\x89PNG") and pixels(png, "tab:blue") > 100, i  # bars, lines
    assert pixels(pngs[2], "tab:gray") > 1000  # the timeline's chain runs around the model's
    html = "".join(d.get("text/html", "") for d in data)
    for session in ("s-1", "s-2", "s-3"):
        assert session in html
    per_session = next(t for t in tables if t.lstrip().startswith("calls"))
    lines = {line.split()[0]: line.split()[1:] for line in per_session.splitlines()[2:]}
    assert lines["s-1"] == ["3", str(sum(20 + 3 * i for i in range(3))
                                     + sum(5 + i % 7 for i in range(3))), "0"]  # fmt: skip
    assert lines["s-2"][0] == "2" and lines["s-2"][2] == "2"  # the failed chain and its step
    assert lines["s-3"][0] == "5"  # four calls and the streamed one
    in_sql = next(t for t in tables if "users" in t)
    assert in_sql.split() == [
        "session_id", "calls", "total_tokens", "errors", "users",
        "0", "s-1", "3", lines["s-1"][1], "0", "1",
        "1", "s-2", "2", lines["s-2"][1], "2", "1",
        "2", "s-3", "5", lines["s-3"][1], "0", "1",
    ]  # fmt: skip

    trace = next(t for t in tables if "depth" in t).splitlines()
    assert trace[0].split() == ["depth", "name", "run_type", "latency_ms", "total_tokens",
                                "cost_usd"]  # fmt: skip
    assert [line.split()[1:4] for line in trace[1:]] == [
        ["0", "RunnableSequence", "chain"], ["1", "ChatPromptTemplate", "chain"],
        ["1", "GenericFakeChatModel", "chat_model"], ["1", "StrOutputParser", "chain"],
    ]  # fmt: skip
    # the last call of s-1 (i = 2) used 20 + 3 * 2 input and 5 + 2 output tokens; no price
    assert trace[3].split()[-2:] == ["33.0", "None"]

    # the embedded BigQuery keeps its data: a second run shows the same figures, not twice
    def figures(tables: list[str]) -> list[str]:  # per session, per user, in SQL
        return [t for t in tables if "timestamp" not in t and "depth" not in t]

    assert len(figures(tables)) == 3
    assert figures(run_notebook(tmp_path)[2]) == figures(tables)


def test_trace_timeline_and_usage_plots_show_what_the_table_holds(
    bq_client, make_handler, table_name, tmp_path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    nb = notebook.AuditNotebook(AuditSettings(table=table_name), bq_client)
    handler = make_handler()
    run_traced_chain(handler)
    usage = [{"input_tokens": 10 * i, "output_tokens": 1, "total_tokens": 10 * i + 1}
             for i in (1, 2)]  # fmt: skip
    model = GenericFakeChatModel(messages=iter([AIMessage("a", usage_metadata=u) for u in usage]))
    for question in ("q1", "q2"):
        model.invoke(question, config={"callbacks": [handler]})
    assert handler.flush(timeout=60)

    trace = nb.trace(TRACE)
    assert list(zip(trace.depth, trace.name, strict=True)) == [
        (0, "RunnableSequence"), (1, "ChatPromptTemplate"), (1, "FakeListChatModel"),
        (1, "StrOutputParser"), (1, "shout"),
    ]  # fmt: skip
    ax = notebook.plot_trace(trace)
    bars = ax.patches
    assert len(bars) == len(trace) == 5  # one bar per run of the trace
    labels = [t.get_text().rstrip() for t in ax.get_yticklabels()]
    assert labels == ["RunnableSequence", "  ChatPromptTemplate", "  FakeListChatModel",
                      "  StrOutputParser", "  shout"]  # fmt: skip
    # each bar spans its run: from its start (ms after the root's) to its end
    ms = (trace.timestamp - trace.start_time).dt.total_seconds() * 1000
    assert [b.get_width() for b in bars] == pytest.approx(list(ms))
    offsets = (trace.start_time - trace.start_time[0]).dt.total_seconds() * 1000
    assert [b.get_x() for b in bars] == pytest.approx(list(offsets))
    assert all(b.get_x() + b.get_width() <= bars[0].get_width() for b in bars[1:])
    assert bars[2].get_facecolor() != bars[1].get_facecolor()  # the model call stands out
    ax.figure.savefig(tmp_path / "trace.png")

    tokens_ax, cost_ax = notebook.plot_usage(nb.recent(100))
    (line,) = tokens_ax.lines  # running total of the model calls, in the order they ended
    assert list(line.get_ydata()) == [0, 0, 11, 32]  # FakeListChatModel (twice): no usage
    assert not cost_ax.lines and "no call has a price" in cost_ax.texts[0].get_text()
    tokens_ax.figure.savefig(tmp_path / "usage.png")
    timeline, usage_png = ((tmp_path / n).read_bytes() for n in ("trace.png", "usage.png"))
    # The model call's bar is as wide as its share of the trace, which a loaded machine
    # shrinks to a few pixels: every pixel wholly inside the bar must be blue.
    box = bars[2].get_window_extent()  # in the saved image's pixels (savefig.dpi: "figure")
    inside = max(0, int(box.width) - 2) * max(0, int(box.height) - 2)
    assert int(box.height) > 10 and pixels(timeline, "tab:blue") >= inside
    assert pixels(timeline, "tab:gray") > 1000  # the root's bar spans the whole axis
    assert pixels(usage_png, "tab:blue") > 100  # the tokens line


def test_plots_of_nothing_say_so_instead_of_raising(bq_client, make_handler, table_name) -> None:
    """A fresh kernel's `nb.recent()` (this run's rows: none yet), a session with no rows, a
    trace id no row has: the frames are empty, and the plots draw an empty figure."""
    import matplotlib

    matplotlib.use("Agg")
    nb = notebook.AuditNotebook(AuditSettings(table=table_name), bq_client)
    handler = make_handler()
    run_traced_chain(handler)
    assert handler.flush(timeout=60)

    none = nb.recent(100, session="no-such-session")
    assert len(none) == 0
    tokens_ax, _ = notebook.plot_usage(none)
    assert tokens_ax.figure is not None
    no_trace = nb.trace("no-such-trace")
    assert len(no_trace) == 0
    assert notebook.plot_trace(no_trace).figure is not None
