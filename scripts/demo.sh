#!/usr/bin/env bash
# Install into .venv and run the demo against the embedded local BigQuery.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" local
exec "$root/.venv/bin/bq-audit" demo "$@"
