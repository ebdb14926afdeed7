#!/usr/bin/env bash
# Create .venv with Python 3.13 (the embedded BigQuery needs it) and install the project
# with the extras given as $1 (e.g. "local" or "local,dev"). Safe to run again: it reinstalls
# only when pyproject.toml or the extras changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-local}"
venv="${BQ_AUDIT_VENV:-$root/.venv}"

is_313() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1; }

find_python() {
  local candidate
  if command -v python3.13 >/dev/null 2>&1 && is_313 python3.13; then
    command -v python3.13; return 0
  fi
  local pyenv_root="${PYENV_ROOT:-}"
  if [ -z "$pyenv_root" ] && command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
  [ -n "$pyenv_root" ] || pyenv_root="$HOME/.pyenv"
  for candidate in "$pyenv_root"/versions/3.13*/bin/python3.13; do
    if [ -x "$candidate" ] && is_313 "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! is_313 "$venv/bin/python"; then
  py="$(find_python)" || {
    echo "error: Python 3.13 is needed (the embedded BigQuery runs only on 3.13), and none was" >&2
    echo "found on PATH nor under \$(pyenv root)/versions/3.13*/bin/. Install it, e.g.:" >&2
    echo "  pyenv install 3.13" >&2
    exit 1
  }
  echo "creating $venv with $py" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

stamp="$venv/.installed"
want="$extras $(cksum < "$root/pyproject.toml")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing langchain-bq-audit[$extras] into $venv ..." >&2
  log="$(mktemp)"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      -e "$root[$extras]" >"$log" 2>&1; then
    grep -v "^WARNING: Location .* is ignored" "$log" >&2 || true
    rm -f "$log"
    echo "error: pip could not install langchain-bq-audit[$extras] (see above)" >&2
    exit 1
  fi
  rm -f "$log"
  "$venv/bin/python" -c 'import langchain_bq_audit' # fails loudly if the install did not work
  echo "$want" > "$stamp"
fi
