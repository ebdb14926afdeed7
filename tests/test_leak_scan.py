"""The suite-wide secret scan (tests/leak_scan.py, run by conftest when each session's
emulator stops) finds a planted secret in a row and in a spool segment, and passes clean ones."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from langchain_bq_audit.spool import Spool

from .leak_scan import KNOWN, leaks_in_files, leaks_in_tables


def test_the_scan_names_a_secret_in_any_row_of_any_table(bq_client) -> None:
    from google.cloud import bigquery

    # a dataset of its own: the session-end scan reads language_model_logging only
    dataset = f"{bq_client.project}.leak_scan_{uuid.uuid4().hex[:6]}"
    bq_client.create_dataset(dataset)
    schema = [bigquery.SchemaField("output_text", "STRING"),
              bigquery.SchemaField("metadata", "JSON")]  # fmt: skip
    for name in ("clean", "leaky"):
        bq_client.create_table(bigquery.Table(f"{dataset}.{name}", schema=schema))
    clean = [{"output_text": "fine", "metadata": {"k": "v"}}]
    leaky = [*clean, {"output_text": "fine", "metadata": {"nested": [f"x {KNOWN[-1]} y"]}}]
    assert bq_client.insert_rows_json(f"{dataset}.clean", clean) == []
    assert bq_client.insert_rows_json(f"{dataset}.leaky", leaky) == []

    scanned, found = leaks_in_tables(bq_client, dataset)
    assert scanned == 3
    assert len(found) == 1 and found[0].startswith(f"leaky: [{KNOWN[-1]!r}]"), found


def test_the_scan_names_a_secret_in_a_spool_segment() -> None:
    # outside the session's temp folder, which the session-end scan reads
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        spool = Spool(folder, "p.d.t", max_bytes=10**6)
        spool.append([{"event_id": "e1", "input_text": "fine"}])
        spool.seal()
        assert leaks_in_files(folder) == []
        spool.append([{"event_id": "e2", "input_text": f"key {KNOWN[0]}"}])
        spool.seal()
        found = leaks_in_files(folder)
        assert found and all(repr([KNOWN[0]]) in line for line in found), found
