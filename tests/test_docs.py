"""The README stays true: its schema table and its two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from langchain_bq_audit import schema

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_schema_table_is_schema_py() -> None:
    assert schema.to_markdown() in README


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    assert [b.strip() for b in blocks] == ["./scripts/demo.sh", "./scripts/test.sh"]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
