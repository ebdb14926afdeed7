"""Runs last (file order): no secret the suite handed to LangChain is in any row it wrote, nor
in any spool or dead-letter file it left.

The secrets are the suite's own fixed strings, looked for as they are: the product's
patterns are not the oracle, so a format they miss is a failure here, not a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .planted import PLANTED
from .test_privacy import PII
from .test_secrets import segment_texts

# Secrets the suite hands to LangChain on purpose (SecretStr fields, prompts, metadata, tool
# arguments), each as the exact string that must not be written.
KNOWN = (
    "sk-scripted-secret-0000",  # tests/models.py ScriptedChatModel.api_key
    PII["api_key"],
    PII["bearer"].split()[1],
    PII["aws"],
    *PII["pem"].splitlines()[1:-1],  # the key's body, line by line
    *PLANTED,
)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def test_no_row_written_by_the_suite_holds_a_secret(bq_client) -> None:
    tables = [
        t for t in bq_client.list_tables("local.language_model_logging") if t.table_type == "TABLE"
    ]
    assert len(tables) > 10, "the scan should see the suite's tables"
    scanned = 0
    for table in tables:
        for row in bq_client.list_rows(table, timeout=60):
            for text in strings(dict(row)):
                leaked = [k for k in KNOWN if k in text]
                assert not leaked, f"{table.table_id}: {leaked} in {text[:200]!r}"
            scanned += 1
    assert scanned > 1000


def test_no_spool_or_dead_letter_file_left_by_the_suite_holds_a_secret(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    texts = segment_texts(tmp_path_factory.getbasetemp())
    assert len(texts) > 10, "the scan should see the suite's spool segments"
    for text in texts:
        leaked = [k for k in KNOWN if k in text]
        assert not leaked, f"{leaked} in {text[:200]!r}"
