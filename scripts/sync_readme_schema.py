"""Rewrite the schema table in README.md from schema.py (the docs test checks they agree)."""

import re
from pathlib import Path

from langchain_bq_audit import schema

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
for header, columns in (("column", schema.COLUMNS), ("digest column", schema.DIGEST_COLUMNS)):
    table = re.compile(rf"^\| {header} \| type \| mode \| description \|\n(?:^\|.*\|\n)+", re.M)
    text, count = table.subn(schema.to_markdown(columns, header) + "\n", text)
    if count != 1:
        raise SystemExit(f"expected one {header} table in {readme}, found {count}")
readme.write_text(text)
