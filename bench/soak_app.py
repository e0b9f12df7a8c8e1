"""The app the chaos soak runs (``python -m bench.soak``): one queue, five kinds of task.

Every run of every task appends events to a Redis list that no fault touches (the
``SOAK_RECORD_URL``, on the broker's server, which the soak never restarts), so the soak
can account for every task id afterwards: ``start`` when a run begins, then exactly one of
``end`` (succeeded), ``retry`` (failed, a retry was published), ``fail`` (failed for good)
when it ends. A run with a ``start`` and nothing after it was interrupted. Each event
carries the run's process group, which is its worker's main pid, so the soak knows which
interrupted runs a ``kill -9`` explains.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, Task

import celery_reliable
from celery_reliable import ReliableTask

#: The soak's queue and key prefix come from the environment, so each run is private.
PREFIX = os.environ.get("SOAK_PREFIX", "soak")
QUEUE = os.environ.get("SOAK_QUEUE", "soak")
#: The shared bucket of ``soak.limited`` (high enough not to dominate the run's length).
RATE = os.environ.get("SOAK_RATE", "200/s")
#: Longest pause in a task body, in seconds: runs are in flight when a kill lands.
MAX_PAUSE = float(os.environ.get("SOAK_MAX_PAUSE", "0.02"))

app = Celery("soak", broker=os.environ.get("SOAK_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    result_backend=None,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "global_keyprefix": f"{PREFIX}:",
        # A last resort only: the soak proves recovery without waiting for it.
        "visibility_timeout": 3600,
    },
    reliable_redis_url=os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/1"),
    reliable_key_prefix=PREFIX,
    reliable_heartbeat_interval=1.0,
    reliable_worker_timeout=3.0,
    reliable_reaper_interval=1.0,
    reliable_drain_timeout=5.0,
)
celery_reliable.install(app)

_clients: dict[int, redis.Redis] = {}


def _recorder() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        url = os.environ.get("SOAK_RECORD_URL", "redis://127.0.0.1:6379/2")
        client = _clients[os.getpid()] = redis.Redis.from_url(url)
    return client


def events_key(prefix: str = PREFIX) -> str:
    return f"{prefix}:soak:events"


def record(task: Any, event: str, **extra: Any) -> None:
    entry = {
        "id": task.request.id,
        "task": task.name,
        "ev": event,
        "pid": os.getpid(),
        "pg": os.getpgid(0),
        "t": time.time(),
        **extra,
    }
    _recorder().rpush(events_key(), json.dumps(entry))


def pause(x: int) -> None:
    time.sleep(MAX_PAUSE * ((x * 7919) % 101) / 100)


class Doomed(Exception):
    """A failure no retry can fix: dead-lettered at once."""


class VendorDown(IOError):
    """The guarded dependency failed; worth a retry, and counted by the breaker."""


class Recorded(Task):  # type: ignore[misc]
    """Records the end of a run that did not succeed (retry or failure for good)."""

    abstract = True

    def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        record(self, "retry")

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if self.request.id == task_id:  # in the pool process (not a hard time limit)
            record(self, "fail")


class ReliableRecorded(ReliableTask, Recorded):  # type: ignore[misc]
    abstract = True


@app.task(base=Recorded, bind=True, acks_late=True, name="soak.plain")
def plain(self: Any, x: int) -> int:
    """A plain Celery task (acks_late) on the same queue."""
    record(self, "start")
    pause(x)
    record(self, "end")
    return x


@app.task(base=ReliableRecorded, bind=True, name="soak.reliable")
def reliable(self: Any, x: int) -> int:
    record(self, "start")
    pause(x)
    record(self, "end")
    return x


@app.task(base=ReliableRecorded, bind=True, name="soak.ordered", ordering_key="key")
def ordered(self: Any, key: str, n: int) -> int:
    """The n-th task of ``key``: the soak checks they never overlap and start in order."""
    record(self, "start", key=key, n=n)
    pause(n)
    record(self, "end", key=key, n=n)
    return n


@app.task(base=ReliableRecorded, bind=True, name="soak.limited", global_rate_limit=RATE)
def limited(self: Any, x: int) -> int:
    record(self, "start")
    record(self, "end")
    return x


@app.task(
    base=ReliableRecorded,
    bind=True,
    name="soak.guarded",
    breaker="soak-vendor",
    breaker_fail_max=5,
    breaker_reset_timeout=1.0,
    autoretry_for=(VendorDown,),
    max_retries=None,
    default_retry_delay=0.2,
)
def guarded(self: Any, x: int, failures: int) -> int:
    """Fails its first ``failures`` attempts (the breaker counts them), then succeeds."""
    record(self, "start")
    if self.request.retries < failures:
        raise VendorDown(f"attempt {self.request.retries + 1} of {x}")
    record(self, "end")
    return x


@app.task(base=ReliableRecorded, bind=True, name="soak.doomed", dead_letter_for=(Doomed,))
def doomed(self: Any, x: int) -> None:
    """Always fails for good: must be dead-lettered exactly once."""
    record(self, "start")
    raise Doomed(f"task {x} cannot succeed")
