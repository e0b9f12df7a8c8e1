#!/usr/bin/env bash
# The test command with both cores busy: stress-ng loads every CPU while scripts/test.sh
# runs (arguments go to pytest). Run it before landing a timing-sensitive change.
#   bash scripts/test-under-load.sh tests/test_rate_limit.py -q
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RELIABLE_LOAD_PACKAGES=1
source "$ROOT/scripts/setup.sh"
stress-ng --cpu "${RELIABLE_LOAD_CPUS:-$(nproc)}" --timeout 0 --quiet &
LOAD=$!
trap 'kill "$LOAD" 2>/dev/null; wait "$LOAD" 2>/dev/null || true' EXIT
bash "$ROOT/scripts/test.sh" "$@"
