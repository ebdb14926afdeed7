#!/usr/bin/env bash
# Install into .venv (with the embedded BigQuery and test tools), lint, and run the tests.
# The tests start their own local BigQuery; extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" local,dev,pulumi,notebook,write-api
cd "$root"
.venv/bin/ruff check langchain_bq_audit tests scripts benchmarks
.venv/bin/ruff format --check langchain_bq_audit tests scripts benchmarks
.venv/bin/mypy langchain_bq_audit benchmarks
exec .venv/bin/python -m pytest "$@"
