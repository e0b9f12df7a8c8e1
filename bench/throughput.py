"""Throughput of a no-op ReliableTask vs the same task as a plain Celery Task.

Both run in the same invocation, on the same private redis-server, with the same prefork
worker settings; the result is a ratio. Each round pre-fills the queue with N messages,
starts a real ``celery worker`` and times from its first task to its N-th.

Usage:
    python -m bench.throughput [--tasks 3000] [--rounds 2] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis

from celery_reliable.testing import RedisServer, WorkerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent


def run_round(server: RedisServer, variant: str, tasks: int, concurrency: int) -> float:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        "BENCH_BROKER_URL": server.url(0),
        "BENCH_REDIS_URL": server.url(1),
        "BENCH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update(env)
    from bench.app import app

    app.conf.reliable_key_prefix = prefix
    app.conf.broker_url = server.url(0)
    app.conf.reliable_redis_url = server.url(1)
    queue = f"{prefix}-q"
    task = app.tasks[f"bench.{variant}"]
    with app.producer_or_acquire() as producer:
        for i in range(tasks):
            task.apply_async((i,), queue=queue, producer=producer)
    client = redis.Redis.from_url(server.url(1))
    done_key = f"{prefix}:bench:done"
    worker = WorkerProcess(
        "bench.app:app",
        name=f"bench-{variant}",
        queues=[queue],
        concurrency=concurrency,
        env=env,
        cwd=str(ROOT),
        loglevel="WARNING",
    ).start()
    try:
        wait_for(
            lambda: int(client.get(done_key) or 0) >= 1,
            60,
            interval=0.001,
            message="the first task",
        )
        start = time.perf_counter()
        wait_for(
            lambda: int(client.get(done_key) or 0) >= tasks,
            300,
            interval=0.005,
            message=f"{tasks} tasks",
        )
        return (tasks - 1) / (time.perf_counter() - start)
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    opts = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        rates: dict[str, list[float]] = {"plain": [], "reliable": []}
        for _ in range(opts.rounds):
            for variant in ("plain", "reliable"):  # interleaved, so drift hits both
                rates[variant].append(run_round(server, variant, opts.tasks, opts.concurrency))
        for variant, values in rates.items():
            print(
                f"{variant:>9}: {statistics.median(values):8.0f} tasks/s "
                f"(rounds: {', '.join(f'{v:.0f}' for v in values)})"
            )
        ratio = statistics.median(rates["reliable"]) / statistics.median(rates["plain"])
        print(
            f"    ratio: {ratio:.2f} (ReliableTask / plain Task), {opts.tasks} tasks, "
            f"prefork -c {opts.concurrency}"
        )
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
