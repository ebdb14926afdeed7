#!/usr/bin/env bash
# Host invariance, checked with langchain-core's own unit tests: runs the callbacks, runnables,
# tracers, language_models, tools, prompts and output_parsers tests of the installed
# langchain-core's source distribution twice, plainly and with the audit handler attached
# globally (`bq-audit run`, writing to a local BigQuery), and prints every test whose outcome
# differs. Exit 1 on a difference not listed in ALLOWED below, or if the handler wrote no
# rows or raised in a callback. Test tools go into .venv (never into the package's deps).
#
#   ./scripts/host-suite.sh            # about 4 minutes on 2 cores; extra args go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "no $py: run ./scripts/bootstrap.sh local,dev first" >&2; exit 2; }

# Tests whose outcome may differ, each "name  why". Only tests that assert the exact list of
# handlers a callback manager holds belong here: a configure hook (ours, or LangSmith's
# tracer when tracing is on) adds one to every manager LangChain configures.
ALLOWED=(
  "tests.unit_tests.runnables.test_config::test_merge_config_callbacks  counts the handlers of a trace_as_chain_group manager, which CallbackManager.configure makes (so the hook adds ours)"
)

version="$("$py" -c 'import importlib.metadata as m; print(m.version("langchain-core"))')"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/langchain-bq-audit/host-suite"
sdist="$cache/langchain_core-$version.tar.gz"
mkdir -p "$cache"
if [ ! -f "$sdist" ]; then
  echo "downloading the langchain-core $version source distribution (once; kept in $cache)"
  "$py" -m pip download -q --no-deps --no-binary :all: "langchain-core==$version" -d "$cache"
fi
work="$(mktemp -d)"
emulator_pid=""
cleanup() {
  if [ -n "$emulator_pid" ]; then kill "$emulator_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
tar xzf "$sdist" -C "$work"
src="$work/langchain_core-$version"

echo "test tools for langchain-core's suite, into .venv (langchain-core stays $version)"
echo "langchain-core==$version" > "$work/pin.txt"
"$py" -m pip install -q -c "$work/pin.txt" "pytest-asyncio>=1.3,<2" "syrupy>=5,<6" \
  "freezegun>=1.2.2,<2" "pytest-mock>=3.10,<4" "responses>=0.25,<1" "pytest-socket>=0.7,<0.9" \
  "blockbuster>=1.5.18,<1.6" "grandalf>=0.8,<1" "langchain-tests>=1.1.9,<2" \
  2> >(grep -v "is ignored" >&2)

# The handler is made when pytest starts (not lazily inside some test's event loop, where
# blockbuster would refuse its file and socket calls); at the end it is flushed and its
# counters saved for the report below.
mkdir -p "$work/probe"
cat > "$work/probe/bq_audit_probe.py" <<'EOF'
import json
import os

import langchain_bq_audit


def pytest_configure(config):
    handler = langchain_bq_audit.global_handler()
    assert handler is not None, "the launcher did not attach the audit handler"


def pytest_unconfigure(config):
    handler = langchain_bq_audit.global_handler()
    handler.flush(timeout=120)
    with open(os.environ["BQ_AUDIT_PROBE_OUT"], "w") as f:
        json.dump(handler.stats(), f, default=str)
EOF

"$root/.venv/bin/bq-audit" emulator --data-dir "$work/emulator" > "$work/emulator.log" 2>&1 &
emulator_pid=$!
for _ in $(seq 120); do
  grep -q "export BIGQUERY_EMULATOR_HOST=" "$work/emulator.log" && break
  sleep 1
done
endpoint="$(sed -n 's/.*export BIGQUERY_EMULATOR_HOST=//p' "$work/emulator.log")"
[ -n "$endpoint" ] || { cat "$work/emulator.log" >&2; exit 2; }
table="host_suite_$(date +%s)"

subset=(tests/unit_tests/callbacks tests/unit_tests/runnables tests/unit_tests/tracers
        tests/unit_tests/language_models tests/unit_tests/test_tools.py
        tests/unit_tests/prompts tests/unit_tests/output_parsers)
cd "$src"
start=$SECONDS
echo "langchain-core $version unit tests, plainly ..."
"$py" -m pytest "${subset[@]}" -q -p no:cacheprovider -p no:randomly \
  --junitxml="$work/plain.xml" "$@" > "$work/plain.log" 2>&1 || true
tail -1 "$work/plain.log"
echo "... and with LANGCHAIN_BQ_AUDIT (bq-audit run), writing to $endpoint table $table ..."
PYTHONPATH="$work/probe" BQ_AUDIT_PROBE_OUT="$work/probe.json" BQ_AUDIT_SPOOL_DIR="$work/spool" \
  "$root/.venv/bin/bq-audit" run --endpoint "$endpoint" --table "$table" -- \
  "$py" -m pytest "${subset[@]}" -q -p no:cacheprovider -p no:randomly -p bq_audit_probe \
  --junitxml="$work/attached.xml" "$@" > "$work/attached.log" 2>&1 || true
tail -1 "$work/attached.log"
echo "both runs: $((SECONDS - start)) s"

status=0
"$py" - "$work" "$endpoint" "$table" "${ALLOWED[@]}" <<'EOF' || status=$?
import json
import sys
import xml.etree.ElementTree as ET

from langchain_bq_audit.client import make_client
from langchain_bq_audit.reading import run_query
from langchain_bq_audit.settings import AuditSettings

work, endpoint, table, *allowed_lines = sys.argv[1:]
allowed = {line.split(None, 1)[0]: line for line in allowed_lines}


def outcomes(path):
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        out[name] = kinds[0] if kinds else "passed"
    return out


plain, attached = outcomes(f"{work}/plain.xml"), outcomes(f"{work}/attached.xml")
differ = sorted(n for n in plain.keys() | attached.keys() if plain.get(n) != attached.get(n))
unexplained = [n for n in differ if n not in allowed]
print(f"{len(plain)} tests; outcome differs for {len(differ)}, unexplained {len(unexplained)}")
for name in differ:
    why = allowed.get(name, "UNEXPLAINED")
    print(f"  {name}: {plain.get(name, 'absent')} plainly, {attached.get(name, 'absent')} "
          f"attached  [{why}]")

stats = json.load(open(f"{work}/probe.json"))
client = make_client(AuditSettings(emulator_host=endpoint))
(row,) = run_query(client, f"SELECT COUNT(*) AS n FROM `{client.project}."
                           f"language_model_logging.{table}`")
print(f"audit handler: {row['n']} rows in {table}; written {stats['written']}, callback errors "
      f"{stats['callback_errors']}, unmatched ends {stats['unmatched_ends']}")
ok = not unexplained and row["n"] > 0 and stats["callback_errors"] == 0
sys.exit(0 if ok else 1)
EOF
if [ "$status" -ne 0 ]; then
  cp "$work/plain.log" "$work/attached.log" "$cache/"
  echo "the two pytest outputs are in $cache/plain.log and $cache/attached.log" >&2
fi
exit "$status"
