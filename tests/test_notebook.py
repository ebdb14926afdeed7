"""The quickstart notebook runs headless, end to end, on its own embedded BigQuery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


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


def test_quickstart_notebook_runs_and_shows_its_tables_and_plots(tmp_path, monkeypatch) -> None:
    # no project and no running emulator configured: the notebook starts its own
    for var in ("BIGQUERY_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "BQ_AUDIT_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BQ_AUDIT_EMULATOR_DATA_DIR", str(tmp_path / "bq"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    text, data, tables = run_notebook(tmp_path)

    assert "streamed: Answer number 9." in text
    assert "failed as expected: the tool is down" in text
    assert sum("image/png" in d for d in data) == 2  # latency histogram, tokens per user
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

    # the embedded BigQuery keeps its data: a second run shows the same figures, not twice
    figures = [t for t in tables if "timestamp" not in t]  # per session, per user, in SQL
    assert len(figures) == 3
    assert [t for t in run_notebook(tmp_path)[2] if "timestamp" not in t] == figures
