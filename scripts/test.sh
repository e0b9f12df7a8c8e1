#!/usr/bin/env bash
# The test command: installs what is missing, then lint, type-check and the whole suite.
# Tests start their own redis-server on a free port; RabbitMQ tests use 127.0.0.1:5672.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RELIABLE_TEST_PACKAGES=1   # prometheus and docker-compose too
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

if command -v rabbitmqctl >/dev/null 2>&1 && ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "--> starting RabbitMQ"
  rabbitmq-server -detached || true
  for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi

echo "--> ruff"
ruff check celery_reliable tests examples bench noxfile.py
ruff format --check celery_reliable tests examples bench noxfile.py
echo "--> mypy"
mypy
echo "--> import layers (import-linter)"
lint-imports
echo "--> pytest"
pytest "$@"
