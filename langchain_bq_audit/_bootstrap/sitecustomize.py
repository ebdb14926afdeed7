"""Run by Python at start-up in every process `bq-audit run` starts (this folder is first on
their `PYTHONPATH`): loads the global hook, then the `sitecustomize` this one shadows."""

import os

try:
    from langchain_bq_audit import global_hook

    global_hook.chain_sitecustomize(os.path.dirname(os.path.abspath(__file__)))
except Exception as exc:  # a broken audit install must not stop the application
    import sys

    print(f"langchain-bq-audit: the launcher could not load the audit hook: {exc!r}",
          file=sys.stderr)  # fmt: skip
