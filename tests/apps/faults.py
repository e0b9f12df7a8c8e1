"""A test app for store faults: tasks that record every run in the *broker's* Redis (so a
test can count runs while the coordination store is full, down or restarted empty), and an
injected store failure whose exception cannot be unpickled.

``CR_INJECT_UNPICKLABLE=1``: in each pool process, the first ordering start script fails
with :class:`UnpicklableStoreError` (a ``redis.RedisError`` whose ``args`` do not rebuild
it, as redis-py's cluster errors could not), the way a Redis Cluster MOVED reply would.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app

_clients: dict[int, redis.Redis] = {}


class UnpicklableStoreError(redis.RedisError):
    """Pickles, but does not unpickle: ``__init__`` takes two arguments, ``args`` holds one."""

    def __init__(self, slot: str, node: str) -> None:
        super().__init__(f"{slot} {node}")


def broker_redis(app: Celery) -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(
            app.conf.broker_url, decode_responses=True
        )
    return client


def runs_key(app: Celery, task_id: str) -> str:
    return f"{app.conf.reliable_key_prefix}:test:runs:{task_id}"


def count_run(app: Celery, task: Any, event: str = "run") -> None:
    broker_redis(app).rpush(runs_key(app, task.request.id), f"{event}:{os.getpid()}")


def runs(app: Celery, task_id: str) -> list[str]:
    return list(broker_redis(app).lrange(runs_key(app, task_id), 0, -1))


def build(app: Celery) -> Celery:
    task = functools.partial(app.task, base=ReliableTask, bind=True, shared=False)

    @task(name="faults.doomed", dead_letter_for=(KeyError,))
    def doomed(self: Any, x: int) -> None:
        """Fails for good at once: its dead letter must be written before the ack."""
        count_run(app, self)
        raise KeyError(f"no such thing: {x}")

    @task(name="faults.hold")
    def hold(self: Any, seconds: float) -> float:
        """Runs ``seconds`` (a message a live worker holds for a while)."""
        count_run(app, self, "start")
        time.sleep(seconds)
        count_run(app, self, "end")
        return seconds

    @task(name="faults.ordered", ordering_key="key")
    def ordered(self: Any, key: str) -> str:
        count_run(app, self)
        return key

    @task(name="faults.reject_unpicklable")
    def reject_unpicklable(self: Any) -> None:
        """Rejects with an exception object the main process could not unpickle."""
        count_run(app, self)
        raise Reject(UnpicklableStoreError("3999", "127.0.0.1:6381"), requeue=False)

    @task(name="faults.ok")
    def ok(self: Any, x: int) -> int:
        count_run(app, self)
        return x

    return app


def _inject_unpicklable(**_: Any) -> None:
    """The first start phase that carries the ordering start fails with the error."""
    from celery_reliable import task as task_module
    from celery_reliable.ordering.scripts import ORD_START

    original = task_module.run_chain
    left = [1]

    def run_chain(store: Any, calls: Any) -> Any:
        if left[0] and any(call.lua is ORD_START for call in calls):
            left[0] -= 1
            raise UnpicklableStoreError("3999", "127.0.0.1:6381")
        return original(store, calls)

    task_module.run_chain = run_chain  # type: ignore[assignment]


if os.environ.get("CR_INJECT_UNPICKLABLE") == "1":
    worker_process_init.connect(_inject_unpicklable, weak=False)

app = install(build(make_app("faults"))) if "CR_BROKER_URL" in os.environ else None
