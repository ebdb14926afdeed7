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
cd "$root"
# Plugins are named, not auto-loaded: pytest rewrites the asserts of every module of a
# distribution that ships a plugin (langsmith's, which LangChain imports), and with
# PYTHONDONTWRITEBYTECODE set it does so again in each process: about 5 CPU-s each.
plugins="--disable-plugin-autoload -p hypothesispytest -p anyio"
export BQ_AUDIT_PYTEST_PLUGINS="$plugins"
# The unit layer on the other supported Pythons (3.13 runs it below, with everything else),
# in the background from the start: its venvs install while .venv does (pip waits on the
# network and the disk as much as on the CPU). Its output is shown once it is done.
unit_log="$(mktemp)"
"$root/scripts/unit.sh" 3.10 3.11 3.12 >"$unit_log" 2>&1 &
unit_pid=$!
trap 'kill "$unit_pid" 2>/dev/null || true; rm -f "$unit_log"' EXIT
"$root/scripts/bootstrap.sh" local,dev,pulumi,notebook,write-api
.venv/bin/ruff check langchain_bq_audit tests scripts benchmarks
.venv/bin/ruff format --check langchain_bq_audit tests scripts benchmarks
.venv/bin/mypy langchain_bq_audit benchmarks
unit_rc=0
wait "$unit_pid" || unit_rc=$?
cat "$unit_log"
if [ "$unit_rc" -ne 0 ]; then
  echo "error: the unit layer failed on Python 3.10-3.12 (exit $unit_rc, see above)" >&2
  exit "$unit_rc"
fi
trap - EXIT
rm -f "$unit_log"
exec .venv/bin/python -m pytest $plugins -p xdist -n "${BQ_AUDIT_TEST_WORKERS:-4}" \
  --dist worksteal --durations=30 "$@"
