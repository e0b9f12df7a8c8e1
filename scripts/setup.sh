#!/usr/bin/env bash
# Shared by scripts/test.sh and examples/demo.sh: a venv with the package, and the services.
# Safe to source more than once; only installs what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELIABLE_VENV:-$ROOT/.venv}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "--> installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi

# stress-ng loads the CPUs for `scripts/test-under-load.sh` (docs/testing.md).
if ! command -v stress-ng >/dev/null 2>&1; then
  echo "--> installing stress-ng (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq stress-ng >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq stress-ng >/dev/null; }
  else sudo apt-get install -y -qq stress-ng >/dev/null \
      || { sudo apt-get update -qq && sudo apt-get install -y -qq stress-ng >/dev/null; }; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "--> creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import celery_reliable, pytest, ruff" >/dev/null 2>&1 \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.reliable-installed" ]; then
  echo "--> installing celery-reliable and its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  touch "$VENV/.reliable-installed"
fi
export PATH="$VENV/bin:$PATH"
