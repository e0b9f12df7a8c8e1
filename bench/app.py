"""The app the benchmarks run: one no-op task per variant, plain Celery and ReliableTask.

Every task counts itself on a Redis that is neither the broker nor the coordination store
(``BENCH_COUNT_URL``), so the store's ``INFO commandstats`` holds the package's commands
only.
"""

from __future__ import annotations

import os

import redis
from celery import Celery, Task

import celery_reliable
from celery_reliable import ReliableTask

#: A rate far above what one worker drains: the bucket is configured but never binds.
UNBINDING_RATE = "1000000/s"

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    reliable_redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1"),
    reliable_key_prefix=os.environ.get("BENCH_PREFIX", "bench"),
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "16")),
)
celery_reliable.install(app)
_counters: dict[int, redis.Redis] = {}


def done() -> None:
    """Count one finished task (the same cost for every variant)."""
    client = _counters.get(os.getpid())
    if client is None:
        url = os.environ.get("BENCH_COUNT_URL", app.conf.reliable_redis_url)
        client = _counters[os.getpid()] = redis.Redis.from_url(url)
    client.incr(f"{app.conf.reliable_key_prefix}:bench:done")


@app.task(base=Task, name="cost.plain", acks_late=True)
def plain(i: int, key: str) -> None:
    done()


@app.task(base=ReliableTask, name="cost.reliable")
def reliable(i: int, key: str) -> None:
    done()


@app.task(base=ReliableTask, name="cost.ordered", ordering_key="key")
def ordered(i: int, key: str) -> None:
    done()


@app.task(
    base=ReliableTask,
    name="cost.every_feature",
    ordering_key="key",
    global_rate_limit=UNBINDING_RATE,
    breaker="bench-cost",
)
def every_feature(i: int, key: str) -> None:
    done()
