#!/usr/bin/env bash
# celery-reliable, end to end, no input needed:
#   a private redis-server, a real worker, a producer, a task that fails into the
#   dead-letter store, `dlq list` / `dlq show`, the fix, `dlq replay`, the replayed task
#   succeeding; then a worker kill -9'ed mid-task and the reaper recovering its task. Everything it starts is stopped on exit (by pid).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

section() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

WORK="$(mktemp -d -t reliable-demo.XXXXXX)"
REDIS_PID=""
WORKER_PID=""
WORKER2_PID=""
REAPER_PID=""
# Fast liveness for the demo (defaults: heartbeat 2 s, a worker dead after 10 s).
export CELERY_RELIABLE_HEARTBEAT_INTERVAL=0.5 CELERY_RELIABLE_WORKER_TIMEOUT=3
export CELERY_RELIABLE_REAPER_INTERVAL=0.5

stop() {  # stop PID gracefully, then for good
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  section "Stopping what the demo started"
  stop "$WORKER_PID" && [ -n "$WORKER_PID" ] && echo "worker (pid $WORKER_PID) stopped"
  stop "$WORKER2_PID" && [ -n "$WORKER2_PID" ] && echo "worker 2 (pid $WORKER2_PID) stopped"
  stop "$REAPER_PID" && [ -n "$REAPER_PID" ] && echo "reaper (pid $REAPER_PID) stopped"
  stop "$REDIS_PID" && [ -n "$REDIS_PID" ] && echo "redis-server (pid $REDIS_PID) stopped"
  if [ "$rc" != 0 ] && [ -f "$WORK/worker.log" ]; then
    echo "--- the worker's log (the demo failed) ---"; tail -n 40 "$WORK/worker.log"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

wait_for_text() {  # wait_for_text FILE TEXT SECONDS
  local i
  for i in $(seq $(($3 * 10))); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; return 1
}

section "1. A private redis-server on a free port"
PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
wait_for_text "$WORK/redis.log" "Ready to accept connections" 10
export SHOP_BROKER_URL="redis://127.0.0.1:$PORT/0"
echo "redis-server pid $REDIS_PID at $SHOP_BROKER_URL"

section "2. A real worker of examples/shop.py (prefork, 2 processes)"
# setsid: the worker gets its own process group, so step 7 can kill -9 all of it
setsid celery -A examples.shop:app worker -l INFO -c 2 -n shop@%h --without-mingle \
  --without-gossip >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
wait_for_text "$WORK/worker.log" " ready." 30
echo "worker pid $WORKER_PID is consuming the 'shop' queue"

section "3. The producer places three orders; the lamp is not in the catalog"
run python -m examples.shop place
python -m examples.shop wait --shipped 2 --dead 1

section "4. The failed order is in the dead-letter store"
run celery -A examples.shop:app reliable dlq list
ID="$(celery -A examples.shop:app reliable dlq list --json \
  | python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')"
run celery -A examples.shop:app reliable dlq show "$ID"

section "5. Fix the cause, then replay"
run python -m examples.shop add-sku lamp
run celery -A examples.shop:app reliable dlq replay --dry-run "$ID"
run celery -A examples.shop:app reliable dlq replay "$ID"

section "6. The replayed task succeeds on the worker, and the store is empty"
python -m examples.shop wait --shipped 3 --dead 0
grep -E "shipped order-[0-9]" "$WORK/worker.log" | sed 's/^.*\] /worker: /'
run python -m examples.shop shipped
run celery -A examples.shop:app reliable dlq list

section "7. A worker dies mid-task (kill -9): the reaper recovers it in seconds"
celery -A examples.shop:app reliable-reaper >"$WORK/reaper.log" 2>&1 &
REAPER_PID=$!
wait_for_text "$WORK/reaper.log" "reaper: started" 30
echo "reaper pid $REAPER_PID is watching worker heartbeats"
run python -m examples.shop pack order-4 --seconds 4
wait_for_text "$WORK/worker.log" "packing order-4" 30
echo "order-4 is being packed on shop@$(hostname); now: kill -9 of the whole worker"
python -m examples.shop killed
kill -KILL -- "-$WORKER_PID" 2>/dev/null || true
wait "$WORKER_PID" 2>/dev/null || true
WORKER_PID=""
setsid celery -A examples.shop:app worker -l INFO -c 2 -n shop2@%h --without-mingle \
  --without-gossip >"$WORK/worker2.log" 2>&1 &
WORKER2_PID=$!
echo "a second worker (pid $WORKER2_PID) is starting"
python -m examples.shop wait-packed order-4 --timeout 60
grep -E "reaper: (worker|recovered)" "$WORK/reaper.log" | sed 's/^\[[^]]*\] //'

section "Done"
echo "The demo ran end to end."
