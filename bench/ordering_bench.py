"""Benchmark: per-key ordering vs unordered ReliableTask vs plain Celery, and the hot-key
hand-off gap, with real prefork workers on a private redis-server.

Run from the repository root:

    .venv/bin/python -m bench.ordering_bench --tasks 2000 --keys 100 --workers 1

Prints, for each kind, the producer's publish rate and the workers' drain rate (tasks are
published to a queue first, then the workers are told to consume it), the ratios, and the
gap between one task's end and the next one's start on a single hot key.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from celery_reliable.testing import RedisServer, WorkerProcess, wait_for
from tests.apps import ordering
from tests.apps.common import install, make_app, recorder

ROOT = Path(__file__).resolve().parent.parent


def run_kind(app: Any, kind: str, tasks: int, keys: int, queue: str) -> tuple[float, float]:
    """Publish ``tasks`` tasks of ``bench.<kind>`` over ``keys`` keys, interleaved, to a
    queue no worker consumes yet; then let the workers consume it. Returns (publish
    seconds, drain seconds): the producer's cost and the workers' throughput apart."""
    task = app.tasks[f"bench.{kind}"]
    counter = f"{app.conf.reliable_key_prefix}:bench:{kind}"
    client = recorder(app)
    client.delete(counter)
    start = time.perf_counter()
    for i in range(tasks):
        task.apply_async((f"k{i % keys}",), queue=queue)
    published = time.perf_counter() - start
    start = time.perf_counter()
    app.control.add_consumer(queue, reply=True, timeout=5)
    wait_for(lambda: int(client.get(counter) or 0) >= tasks, 600, message=f"{kind} drained")
    drained = time.perf_counter() - start
    app.control.cancel_consumer(queue, reply=True, timeout=5)
    return published, drained


def hot_key_gaps(app: Any, tasks: int) -> list[float]:
    """Seconds between the end of task n and the start of task n+1 on one key."""
    hot = app.tasks["bench.hot"]
    key = f"{app.conf.reliable_key_prefix}:bench:hot"
    client = recorder(app)
    for n in range(tasks):
        hot.delay("hot", n)
    wait_for(lambda: client.llen(key) >= 2 * tasks, 600, message="hot key drained")
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in client.lrange(key, 0, -1):
        kind, n, t = line.split()
        (starts if kind == "s" else ends)[int(n)] = float(t)
    return [starts[n + 1] - ends[n] for n in range(tasks - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs")
    parser.add_argument("--hot", type=int, default=300, help="tasks on the hot key")
    opts = parser.parse_args()

    server = RedisServer().start()
    tag = uuid.uuid4().hex[:8]
    env = {
        "CR_BROKER_URL": server.url(0),
        "CR_REDIS_URL": server.url(1),
        "CR_PREFIX": f"bench{tag}",
        "CR_QUEUE": f"bench{tag}",
        "PYTHONPATH": str(ROOT),
    }
    app = install(
        ordering.build(
            make_app(
                "bench",
                env["CR_BROKER_URL"],
                env["CR_REDIS_URL"],
                env["CR_PREFIX"],
                env["CR_QUEUE"],
            )
        )
    )
    workers = [
        WorkerProcess(
            "tests.apps.ordering:app",
            name=f"b{i}",
            queues=[env["CR_QUEUE"]],
            concurrency=opts.concurrency,
            env=env,
            cwd=str(ROOT),
        ).start()
        for i in range(opts.workers)
    ]
    try:
        for w in workers:
            w.wait_ready()
        results: dict[str, tuple[float, float]] = {}
        for round_ in range(opts.rounds + 1):  # round 0 warms every pool process up
            for kind in ("plain", "reliable", "ordered"):
                queue = f"{env['CR_QUEUE']}-{kind}-{round_}"
                took = run_kind(app, kind, opts.tasks if round_ else 200, opts.keys, queue)
                if round_:  # best of the rounds, publish and drain apart
                    best = results.get(kind, took)
                    results[kind] = (min(best[0], took[0]), min(best[1], took[1]))
        gaps = hot_key_gaps(app, opts.hot)
    finally:
        for w in workers:
            w.close()
        server.close()

    print(
        f"{opts.tasks} tasks over {opts.keys} keys, {opts.workers} worker(s) x "
        f"{opts.concurrency} prefork processes, best of {opts.rounds} rounds"
    )
    print(f"{'kind':<10}{'publish/s':>12}{'drain tasks/s':>15}")
    for kind, (published, total) in results.items():
        print(f"{kind:<10}{opts.tasks / published:>12.0f}{opts.tasks / total:>15.0f}")
    rate = {k: opts.tasks / v[1] for k, v in results.items()}
    pub = {k: opts.tasks / v[0] for k, v in results.items()}
    print(f"publish, ordered / unordered ReliableTask: {pub['ordered'] / pub['reliable']:.2f}")
    print(f"ordered / unordered ReliableTask: {rate['ordered'] / rate['reliable']:.2f}")
    print(f"ordered / plain Celery:           {rate['ordered'] / rate['plain']:.2f}")
    print(f"unordered ReliableTask / plain:   {rate['reliable'] / rate['plain']:.2f}")
    gaps_ms = sorted(g * 1000 for g in gaps)
    print(
        f"hot-key hand-off gap over {len(gaps_ms)} hand-offs: median "
        f"{statistics.median(gaps_ms):.2f} ms, p95 {gaps_ms[int(len(gaps_ms) * 0.95)]:.2f} ms, "
        f"p99 {gaps_ms[int(len(gaps_ms) * 0.99)]:.2f} ms, "
        f"max {gaps_ms[-1]:.2f} ms"
    )


if __name__ == "__main__":
    main()
