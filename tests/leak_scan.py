"""The suite-wide secret scan: no secret the tests hand to LangChain is in any row a test
session wrote, nor in any spool or dead-letter file it left.

`tests/conftest.py` runs `assert_no_secret_left` when the session's emulator stops, after
every test of the session (with pytest-xdist: of that worker, on that worker's own emulator
and temp folder), so it sees every row however the tests are spread over workers.
The secrets are the suite's own fixed strings, looked for as they are: the product's
patterns are not the oracle, so a format they miss is a failure here, not a pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .planted import PLANTED
from .test_privacy import PII
from .test_secrets import segment_texts, strings

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


def leaks_in_tables(client: Any, dataset: str) -> tuple[int, list[str]]:
    """Read every row of every table of `project.dataset` (views excluded): how many rows
    were read, and one line per string holding a known secret."""
    from google.api_core.exceptions import NotFound

    try:
        tables = [t for t in client.list_tables(dataset) if t.table_type == "TABLE"]
    except NotFound:  # no test of this session wrote a row
        return 0, []
    scanned, found = 0, []
    for table in tables:
        for row in client.list_rows(table, timeout=60):
            for text in strings(dict(row)):
                leaked = [k for k in KNOWN if k in text]
                if leaked:
                    found.append(f"{table.table_id}: {leaked} in {text[:200]!r}")
            scanned += 1
    return scanned, found


def leaks_in_files(folder: Path) -> list[str]:
    """One line per spool or dead-letter segment text under `folder` holding a secret."""
    found = []
    for text in segment_texts(folder):
        leaked = [k for k in KNOWN if k in text]
        if leaked:
            found.append(f"{leaked} in {text[:200]!r}")
    return found


def assert_no_secret_left(client: Any, folder: Path) -> None:
    """Fail naming each leak in the `language_model_logging` dataset or under `folder`."""
    _, in_rows = leaks_in_tables(client, f"{client.project}.language_model_logging")
    in_files = leaks_in_files(folder)
    assert not in_rows + in_files, "the tests left secrets behind:\n" + "\n".join(
        in_rows + in_files
    )
