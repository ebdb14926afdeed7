#!/usr/bin/env bash
# Install into .venv (with the embedded BigQuery and test tools), lint, run the unit layer on
# Python 3.10-3.12 (scripts/unit.sh), then every test on 3.13.
# The tests start their own local BigQuery; extra arguments go to pytest.
# pytest runs in BQ_AUDIT_TEST_WORKERS pytest-xdist workers (default 4; 0 runs in one
# process), each with its own emulator: the tests mostly wait on the emulator, the writer's
# batching and child processes, so 4 workers keep 2 cores busy. worksteal evens out the
# long tests at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" local,dev,pulumi,notebook,write-api
cd "$root"
.venv/bin/ruff check langchain_bq_audit tests scripts benchmarks
.venv/bin/ruff format --check langchain_bq_audit tests scripts benchmarks
.venv/bin/mypy langchain_bq_audit benchmarks
# Plugins are named, not auto-loaded: pytest rewrites the asserts of every module of a
# distribution that ships a plugin (langsmith's, which LangChain imports), and with
# PYTHONDONTWRITEBYTECODE set it does so again in each process: about 5 CPU-s each.
plugins="--disable-plugin-autoload -p hypothesispytest -p anyio"
export BQ_AUDIT_PYTEST_PLUGINS="$plugins"
# the unit layer on the other supported Pythons (3.13 runs it below, with everything else)
"$root/scripts/unit.sh" 3.10 3.11 3.12
exec .venv/bin/python -m pytest $plugins -p xdist -n "${BQ_AUDIT_TEST_WORKERS:-4}" \
  --dist worksteal --durations=30 "$@"
