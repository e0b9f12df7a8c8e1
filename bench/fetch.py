"""Reliable fetch vs kombu's BRPOP: throughput, and broker commands per message.

Both variants run in the same invocation, interleaved, on one private redis-server, with
the same plain no-op task (``bench.plain``) and the same prefork worker; only
``CELERY_RELIABLE_FETCH`` differs. Each round pre-fills the queue with N messages, starts a
real ``celery worker`` and times from its first task to its N-th. The broker's
``INFO commandstats`` before and after each round gives the commands the worker sent per
message (a deterministic figure, unlike the rate on a shared machine).

Usage:
    python -m bench.fetch [--tasks 3000] [--rounds 2] [--concurrency 2]
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
#: Broker commands counted per message (the consumer's receive and ack path).
COUNTED = ("brpop", "evalsha", "blmove", "zadd", "hset", "zrem", "hdel", "multi", "exec")


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name[len("cmdstat_") :]: int(v["calls"]) for name, v in stats.items()}


def run_round(
    server: RedisServer, fetch: bool, tasks: int, concurrency: int
) -> tuple[float, dict[str, float]]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    env = {
        "BENCH_BROKER_URL": server.url(0),
        "BENCH_REDIS_URL": server.url(1),
        "BENCH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
        "CELERY_RELIABLE_FETCH": "1" if fetch else "0",
    }
    os.environ.update(env)
    from bench.app import app

    app.conf.reliable_key_prefix = prefix
    app.conf.broker_url = server.url(0)
    app.conf.reliable_redis_url = server.url(1)
    queue = f"{prefix}-q"
    task = app.tasks["bench.plain"]
    with app.producer_or_acquire() as producer:
        for i in range(tasks):
            task.apply_async((i,), queue=queue, producer=producer)
    client = redis.Redis.from_url(server.url(1))
    broker = redis.Redis.from_url(server.url(0))
    done_key = f"{prefix}:bench:done"
    before = commandstats(broker)
    worker = WorkerProcess(
        "bench.app:app",
        name=f"bench-fetch-{int(fetch)}",
        queues=[queue],
        concurrency=concurrency,
        env=env,
        cwd=str(ROOT),
        loglevel="WARNING",
    ).start()
    try:
        wait_for(lambda: int(client.get(done_key) or 0) >= 1, 60, interval=0.001)
        start = time.perf_counter()
        wait_for(lambda: int(client.get(done_key) or 0) >= tasks, 300, interval=0.005)
        rate = (tasks - 1) / (time.perf_counter() - start)
    finally:
        worker.close()
    after = commandstats(broker)
    per = {c: (after.get(c, 0) - before.get(c, 0)) / tasks for c in COUNTED}
    return rate, {c: v for c, v in per.items() if v >= 0.01}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    opts = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        rates: dict[bool, list[float]] = {True: [], False: []}
        commands: dict[bool, dict[str, float]] = {}
        for _ in range(opts.rounds):
            for fetch in (False, True):  # interleaved, so drift hits both
                rate, per = run_round(server, fetch, opts.tasks, opts.concurrency)
                rates[fetch].append(rate)
                commands[fetch] = per
        for fetch, values in rates.items():
            name = "reliable fetch" if fetch else "kombu BRPOP"
            shown = ", ".join(f"{c} {n:.2f}" for c, n in sorted(commands[fetch].items()))
            print(
                f"{name:>14}: {statistics.median(values):6.0f} tasks/s "
                f"(rounds: {', '.join(f'{v:.0f}' for v in values)}); "
                f"broker commands per message: {shown}"
            )
        ratio = statistics.median(rates[True]) / statistics.median(rates[False])
        print(
            f"         ratio: {ratio:.2f} (fetch / BRPOP), {opts.tasks} no-op plain tasks, "
            f"prefork -c {opts.concurrency}"
        )
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
