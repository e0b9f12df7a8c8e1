#!/usr/bin/env bash
# Runs docker-compose.yml for real on a machine with no image registry (docs/deploy.md).
#
#   sudo bash scripts/compose-smoke.sh
#
# 1. starts a Docker engine of its own (Debian's docker.io: `dockerd --bridge=none
#    --iptables=false`, its own socket, data root and exec root), unless DOCKER_HOST already
#    answers;
# 2. seeds the image cache: a Debian bookworm rootfs from `debootstrap --variant=minbase`
#    (cached under ~/.cache/celery-reliable/), `docker import`ed, and from it the tags the
#    compose file names, built from Debian's packages (deploy/smoke/*/Dockerfile);
# 3. brings the stack up with deploy/smoke/docker-compose.smoke.yml: every service on the
#    host network, on free 127.0.0.1 ports (no bridge network, no traffic off loopback);
#    Grafana stays out (no Debian package);
# 4. places the shop's orders, waits for the dead letter, fixes its cause, replays it,
#    checks it shipped, prints `reliable status` and Prometheus's targets;
# 5. `down -v`, stops the engine it started, exits 0.
#
# On demand only: not part of CI or scripts/test.sh. Needs root (dockerd, debootstrap).
# Environment: SMOKE_MIRROR (Debian mirror; default: the one apt uses), SMOKE_TIMEOUT
# (seconds to wait for each step, default 180), SMOKE_KEEP_ENGINE=1 (leave the engine
# running for a faster next run), DOCKER_HOST (use that engine instead of starting one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/celery-reliable"
ROOTFS="$CACHE/debian-bookworm-minbase.tar"
BASE_IMAGE=celery-reliable-smoke/debian:bookworm
ENGINE_SOCK=/run/docker-smoke.sock
ENGINE_PIDFILE=/run/docker-smoke.pid
ENGINE_DATA=/var/lib/docker-smoke
ENGINE_EXEC=/run/docker-smoke
TIMEOUT="${SMOKE_TIMEOUT:-180}"
OVERRIDE=deploy/smoke/docker-compose.smoke.yml
export COMPOSE_PROJECT_NAME=celery-reliable-smoke
# Every service of docker-compose.yml but Grafana (no Debian package to build it from).
SERVICES=(redis rabbitmq worker-1 worker-2 reaper producer prometheus)
LEFT_OUT="grafana (grafana/grafana: no Debian package to build the image from)"
# tag the compose file names -> deploy/smoke/<dir>
IMAGES=("python:3.11-slim python" "redis:7 redis" "rabbitmq:3-management rabbitmq"
        "prom/prometheus prometheus")

RUN_DIR="$(mktemp -d /tmp/compose-smoke.XXXXXX)"
ENGINE_PID=""
UP=0
START=$SECONDS

step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { echo "FAILED: $*" >&2; exit 1; }
RENDERED="$RUN_DIR/docker-compose.smoke.yml"
# The stack as run: docker-compose.yml + the override, merged by `docker-compose config`,
# without Grafana and without published ports (deploy/smoke/render.py).
compose() { docker-compose -f "$RENDERED" --project-directory "$ROOT" "$@"; }
shop() {  # a one-off command in the producer's container (its "Creating ..." lines hidden)
  compose run --rm --no-deps -T producer "$@" 2>"$RUN_DIR/run.err" \
    || { cat "$RUN_DIR/run.err" >&2; return 1; }
}

cleanup() {
  local rc=$?
  if [ "$UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      echo "--- last log lines of the stack ---" >&2
      compose logs --no-color --tail 30 >&2 || true
    fi
    step "docker-compose down -v"
    compose down -v --remove-orphans || true
  fi
  if [ -n "$ENGINE_PID" ] && [ "${SMOKE_KEEP_ENGINE:-}" != 1 ]; then
    step "stopping the Docker engine this run started (pid $ENGINE_PID)"
    kill "$ENGINE_PID" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while kill -0 "$ENGINE_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    if kill -0 "$ENGINE_PID" 2>/dev/null; then echo "engine $ENGINE_PID still running" >&2
    else umount "$ENGINE_EXEC/netns/default" 2>/dev/null || true; fi  # dockerd leaves it
  fi
  rm -rf "$RUN_DIR"
  if [ "$rc" = 0 ]; then step "smoke run passed"; else echo "smoke run FAILED (exit $rc)" >&2; fi
}
trap cleanup EXIT

wait_until() {  # wait_until WHAT COMMAND...: poll COMMAND until it succeeds, or fail
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
    sleep 1
  done
}

[ "$(id -u)" = 0 ] || die "run as root: it starts dockerd and runs debootstrap"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]} (Debian packages)"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 1. The engine.
if [ -n "${DOCKER_HOST:-}" ] && docker version >/dev/null 2>&1; then
  step "using the Docker engine at $DOCKER_HOST"
else
  export DOCKER_HOST="unix://$ENGINE_SOCK"
  if docker version >/dev/null 2>&1; then
    step "using the Docker engine already on $ENGINE_SOCK (left running)"
  else
    step "starting dockerd --bridge=none --iptables=false on $ENGINE_SOCK"
    mkdir -p "$ENGINE_DATA" "$ENGINE_EXEC"
    dockerd --bridge=none --iptables=false --ip6tables=false \
      --data-root "$ENGINE_DATA" --exec-root "$ENGINE_EXEC" --pidfile "$ENGINE_PIDFILE" \
      -H "$DOCKER_HOST" >"$RUN_DIR/dockerd.log" 2>&1 &
    ENGINE_PID=$!
    wait_until "dockerd on $ENGINE_SOCK" docker version
    docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
  fi
fi

# 2. The image cache.
if [ ! -s "$ROOTFS" ]; then
  mirror="${SMOKE_MIRROR:-$( { grep -shoE 'https?://[^ ]+/debian/?( |$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/* || true; } | head -n 1 | tr -d ' ')}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  step "debootstrap --variant=minbase bookworm from $mirror (cached in $ROOTFS)"
  mkdir -p "$CACHE"
  target="$RUN_DIR/rootfs"
  debootstrap --variant=minbase bookworm "$target" "$mirror" >"$RUN_DIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$RUN_DIR/debootstrap.log" >&2; die "debootstrap"; }
  rm -rf "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/*
  tar -C "$target" --numeric-owner -cf "$ROOTFS.part" .
  mv "$ROOTFS.part" "$ROOTFS"
  rm -rf "$target"
else
  step "rootfs from the cache: $ROOTFS"
fi
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  step "docker import -> $BASE_IMAGE"
  docker import --change 'CMD ["bash"]' "$ROOTFS" "$BASE_IMAGE" >/dev/null
fi
step "a container runs, with --network none"
docker run --rm --network none "$BASE_IMAGE" sh -c 'echo "Debian $(cat /etc/debian_version)"'

for image in "${IMAGES[@]}"; do
  read -r tag dir <<<"$image"
  step "docker build $tag from deploy/smoke/$dir (Debian packages)"
  context="$RUN_DIR/context-$dir"
  cp -r "deploy/smoke/$dir" "$context"
  if [ "$dir" = python ]; then  # pip in the image trusts the CAs this machine trusts
    cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca-certificates.crt" 2>/dev/null \
      || : >"$context/host-ca-certificates.crt"
  fi
  docker build --quiet --network host --build-arg "BASE=$BASE_IMAGE" -t "$tag" "$context" \
    >"$RUN_DIR/build.log" 2>&1 || { cat "$RUN_DIR/build.log" >&2; die "docker build $tag"; }
done
docker image prune -f >/dev/null  # the layers a rebuild replaced
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -v '^<none>' | sort | sed 's/^/    /'

# 3. The stack, on the host network and free 127.0.0.1 ports.
free_ports() {  # distinct free 127.0.0.1 ports in 20000-29999, below the ephemeral range;
  # the first one also has its +10000..+10010 free (RabbitMQ's CLI distribution ports)
  python3 - "$1" <<'EOF'
import random, socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
taken, want = [], int(sys.argv[1])
while len(taken) < want:
    port = random.randrange(20000, 30000)
    extra = range(port + 10000, port + 10011) if not taken else ()
    if port not in taken and free(port) and all(free(p) for p in extra):
        taken.append(port)
print(*taken)
EOF
}
read -r SMOKE_DIST_PORT SMOKE_AMQP_PORT SMOKE_REDIS_PORT SMOKE_MANAGEMENT_PORT \
  SMOKE_EPMD_PORT SMOKE_WORKER1_METRICS_PORT SMOKE_WORKER2_METRICS_PORT \
  SMOKE_REAPER_METRICS_PORT SMOKE_PROMETHEUS_PORT <<<"$(free_ports 9)"
export SMOKE_DIST_PORT SMOKE_AMQP_PORT SMOKE_REDIS_PORT SMOKE_MANAGEMENT_PORT \
  SMOKE_EPMD_PORT SMOKE_WORKER1_METRICS_PORT SMOKE_WORKER2_METRICS_PORT \
  SMOKE_REAPER_METRICS_PORT SMOKE_PROMETHEUS_PORT
# deploy/prometheus/prometheus.yml with the workers' and the reaper's 127.0.0.1 ports.
export SMOKE_PROMETHEUS_CONFIG="$RUN_DIR/prometheus.yml"
sed -e "s/worker-1:9808/127.0.0.1:$SMOKE_WORKER1_METRICS_PORT/" \
    -e "s/worker-2:9808/127.0.0.1:$SMOKE_WORKER2_METRICS_PORT/" \
    -e "s/reaper:9809/127.0.0.1:$SMOKE_REAPER_METRICS_PORT/" \
    -e "s/scrape_interval: .*/scrape_interval: 2s/" \
    deploy/prometheus/prometheus.yml >"$SMOKE_PROMETHEUS_CONFIG"
chmod 644 "$SMOKE_PROMETHEUS_CONFIG"
chmod 755 "$RUN_DIR"

step "ports on 127.0.0.1: redis $SMOKE_REDIS_PORT, amqp $SMOKE_AMQP_PORT, management" \
  "$SMOKE_MANAGEMENT_PORT, epmd $SMOKE_EPMD_PORT, erlang distribution $SMOKE_DIST_PORT," \
  "worker-1 $SMOKE_WORKER1_METRICS_PORT, worker-2 $SMOKE_WORKER2_METRICS_PORT," \
  "reaper $SMOKE_REAPER_METRICS_PORT, prometheus $SMOKE_PROMETHEUS_PORT"
echo "    left out: $LEFT_OUT"
step "docker-compose -f docker-compose.yml -f $OVERRIDE config | render.py > smoke.yml"
yaml_python=python3  # render.py needs PyYAML: Debian's docker-compose brings python3-yaml
/usr/bin/python3 -c 'import yaml' 2>/dev/null && yaml_python=/usr/bin/python3
docker-compose -f docker-compose.yml -f "$OVERRIDE" config \
  | "$yaml_python" deploy/smoke/render.py "${SERVICES[@]}" >"$RENDERED"
step "docker-compose -f smoke.yml up -d --build ${SERVICES[*]}"
UP=1
UP_AT="$(date +%s.%N)"
compose up -d --build "${SERVICES[@]}" >"$RUN_DIR/up.log" 2>&1 \
  || { cat "$RUN_DIR/up.log" >&2; die "docker-compose up"; }
grep -E '^(Creating|Building|Successfully tagged|WARNING)' "$RUN_DIR/up.log" | sed 's/^/    /' || true
echo "    the engine's networks: $(docker network ls --format '{{.Name}} ({{.Driver}})' | sort \
  | paste -sd, - | sed 's/,/, /g')"

healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$1")")" = healthy ]; }
since_up() {  # since_up RFC3339-TIME: seconds since `up` began
  awk -v t="$(date -d "$1" +%s.%N)" -v up="$UP_AT" 'BEGIN { printf "%5.1fs", t - up }'
}
for service in redis rabbitmq worker-1 worker-2 reaper; do
  wait_until "$service to be healthy" healthy "$service"
  id="$(compose ps -q "$service")"
  first_ok="$(docker inspect -f \
    '{{range .State.Health.Log}}{{if eq .ExitCode 0}}{{.End.Format "2006-01-02T15:04:05.999999999Z07:00"}}{{"\n"}}{{end}}{{end}}' "$id" \
    | head -n 1)"
  echo "    $(printf '%-9s' "$service") started $(since_up \
    "$(docker inspect -f '{{.State.StartedAt}}' "$id")") after \`up\`, healthy $(since_up "$first_ok")"
done

# 4. Orders, the dead letter, the fix, the replay.
step "what listens on the smoke run's ports"
ports="$SMOKE_REDIS_PORT|$SMOKE_AMQP_PORT|$SMOKE_MANAGEMENT_PORT|$SMOKE_EPMD_PORT|$SMOKE_DIST_PORT"
ports="$ports|$SMOKE_WORKER1_METRICS_PORT|$SMOKE_WORKER2_METRICS_PORT|$SMOKE_REAPER_METRICS_PORT"
ports="$ports|$SMOKE_PROMETHEUS_PORT"
ss -Hltnp | awk -v re=":($ports)\$" '$4 ~ re {print "    " $4, $6}' | sort -t: -k2 -n

step "the producer places the orders"
producer_done() {
  [ "$(docker inspect -f '{{.State.Status}}' "$(compose ps -q producer)")" = exited ]
}
wait_until "the producer to exit" producer_done
compose logs --no-color producer | grep -E 'placed' | sed 's/^/    /'
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(compose ps -q producer)")" = 0 ] \
  || die "the producer failed"
step "waiting for 2 orders shipped and 1 dead-lettered"
shop python -m examples.shop wait --shipped 2 --dead 1 --timeout "$TIMEOUT"
step "celery -A examples.shop:app reliable dlq list"
shop celery -A examples.shop:app reliable dlq list | tee "$RUN_DIR/dlq.txt"
grep -q "shop.ship_order" "$RUN_DIR/dlq.txt" || die "no dead letter for shop.ship_order"
step "the fix: python -m examples.shop add-sku lamp"
shop python -m examples.shop add-sku lamp
step "celery -A examples.shop:app reliable dlq replay --task shop.ship_order"
shop celery -A examples.shop:app reliable dlq replay --task shop.ship_order
step "waiting for the replayed order to ship"
shop python -m examples.shop wait --shipped 3 --dead 0 --timeout "$TIMEOUT"
shop python -m examples.shop shipped
compose logs --no-color worker-1 worker-2 | grep -E 'shipped order-2' | sed 's/^/    /' \
  || die "no worker log line for the replayed order"
step "celery -A examples.shop:app reliable status"
shop celery -A examples.shop:app reliable status

step "Prometheus's scrape targets (http://127.0.0.1:$SMOKE_PROMETHEUS_PORT)"
targets() {
  python3 - "$SMOKE_PROMETHEUS_PORT" <<'EOF'
import json, sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/v1/targets"
targets = json.load(urllib.request.urlopen(url, timeout=2))["data"]["activeTargets"]
for t in targets:
    print(f"    {t['labels']['job']:<26} {t['scrapeUrl']:<36} {t['health']}")
sys.exit(0 if len(targets) == 3 and all(t["health"] == "up" for t in targets) else 1)
EOF
}
wait_until "Prometheus to scrape both workers and the reaper" targets
targets

# 5. Teardown (the trap): down -v, then the engine this run started.
