"""The app the benchmarks run: the same no-op task, plain and as a ReliableTask."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, Task

import celery_reliable
from celery_reliable import ReliableTask

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    reliable_redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1"),
    reliable_key_prefix=os.environ.get("BENCH_PREFIX", "bench"),
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "16")),
)
celery_reliable.install(app)
_counter: dict[int, redis.Redis] = {}


def _done() -> None:
    """Count one finished task (the same cost for every variant)."""
    client = _counter.get(os.getpid())
    if client is None:
        client = _counter[os.getpid()] = redis.Redis.from_url(app.conf.reliable_redis_url)
    client.incr(f"{app.conf.reliable_key_prefix}:bench:done")


@app.task(base=Task, name="bench.plain")
def plain(x: int) -> None:
    _done()


@app.task(base=ReliableTask, name="bench.reliable")
def reliable(x: int) -> None:
    _done()


def kwargs_for(i: int) -> dict[str, Any]:
    return {}
