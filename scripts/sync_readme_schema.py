"""Rewrite the schema table in README.md from schema.py (the docs test checks they agree)."""

import re
from pathlib import Path

from langchain_bq_audit import schema

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
table = re.compile(r"^\| column \| type \| mode \| description \|\n(?:^\|.*\|\n)+", re.M)
new, count = table.subn(schema.to_markdown() + "\n", text)
if count != 1:
    raise SystemExit(f"expected one schema table in {readme}, found {count}")
readme.write_text(new)
