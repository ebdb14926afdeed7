"""Runs last (file order): every row the whole suite wrote holds no credential."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_bq_audit.redact import remove_secrets

# Secrets the suite hands to LangChain on purpose (SecretStr fields, prompts, metadata).
KNOWN = ("sk-scripted-secret-0000", "sk-proj-0123456789abcdefghij", "AKIAIOSFODNN7EXAMPLE")


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
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
                assert remove_secrets(text) == text, f"{table.table_id}: secret in {text[:200]!r}"
                assert not any(k in text for k in KNOWN), f"{table.table_id}: {text[:200]!r}"
            scanned += 1
    assert scanned > 1000
