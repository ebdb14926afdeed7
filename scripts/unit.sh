#!/usr/bin/env bash
# The unit layer (tests/unit: no emulator, no network) on each Python given (default: every
# supported one, 3.10 to 3.13), found on PATH or under $(pyenv root)/versions/. One venv per
# version under .venv-unit/, reinstalled only when pyproject.toml changes. A version that is
# not installed is reported and skipped; none found at all is an error.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
pyenv_root="${PYENV_ROOT:-}"
if [ -z "$pyenv_root" ] && command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
[ -n "$pyenv_root" ] || pyenv_root="$HOME/.pyenv"

find_python() {
  local v="$1" candidate
  for candidate in "$(command -v "python$v" 2>/dev/null || true)" "$pyenv_root"/versions/"$v"*/bin/python"$v"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
       "$candidate" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$v')" 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

ran=0
for v in "${versions[@]}"; do
  if ! py="$(find_python "$v")"; then
    echo "unit layer: Python $v not found, skipped" >&2
    continue
  fi
  venv="$root/.venv-unit/$v"
  stamp="$venv/.installed"
  want="unit $(cksum < pyproject.toml)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    log="$(mktemp)"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[unit]" \
        >"$log" 2>&1; then
      grep -v "^WARNING: Location .* is ignored" "$log" >&2 || true
      rm -f "$log"
      echo "error: pip could not install langchain-bq-audit[unit] for Python $v" >&2
      exit 1
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
  fi
  echo "unit layer on Python $v:" >&2
  # shellcheck disable=SC2086  # BQ_AUDIT_PYTEST_PLUGINS: scripts/test.sh's plugin list
  "$venv/bin/python" -m pytest ${BQ_AUDIT_PYTEST_PLUGINS:-} tests/unit -q -p no:cacheprovider
  ran=$((ran + 1))
done
if [ "$ran" -eq 0 ]; then
  echo "error: none of Python ${versions[*]} was found" >&2
  exit 1
fi
