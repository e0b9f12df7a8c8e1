"""A test app for orphan recovery: tasks that run long on their first attempt, tasks that
run long on workers started with ``CR_SLOW=1``, and a task that kills its own worker."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis
from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record, recorder


def attempt(app: Celery, task: Any) -> int:
    """How many times this task id has started (1 on the first run)."""
    return int(
        recorder(app).incr(f"{app.conf.reliable_key_prefix}:test:attempts:{task.request.id}")
    )


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="orphans.first_slow")
    def first_slow(self: Any, tag: str, seconds: float) -> str:
        """Sleeps ``seconds`` on its first run only, so a rerun ends quickly."""
        n = attempt(app, self)
        record(app, self, "started", tag=tag, attempt=n)
        if n == 1:
            time.sleep(seconds)
        record(app, self, "succeeded", tag=tag, attempt=n)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="orphans.slow_here")
    def slow_here(self: Any, tag: str, seconds: float) -> str:
        """Sleeps ``seconds`` on workers started with CR_SLOW=1, else returns at once."""
        n = attempt(app, self)
        record(app, self, "started", tag=tag, attempt=n)
        if os.environ.get("CR_SLOW") == "1":
            time.sleep(seconds)
        record(app, self, "succeeded", tag=tag, attempt=n)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="orphans.slow_twice")
    def slow_twice(self: Any, tag: str, first: float, second: float) -> str:
        """Sleeps ``first`` seconds on its first run, ``second`` on its second, then none."""
        n = attempt(app, self)
        record(app, self, "started", tag=tag, attempt=n)
        time.sleep(first if n == 1 else second if n == 2 else 0)
        record(app, self, "succeeded", tag=tag, attempt=n)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="orphans.touch")
    def touch(self: Any, tag: str) -> str:
        """Records its run in the *broker's* Redis (for tests that stop the other one)."""
        client = redis.Redis.from_url(app.conf.broker_url)
        client.rpush(f"{app.conf.reliable_key_prefix}:test:touched", tag)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="orphans.poison")
    def poison(self: Any, x: int, note: str = "") -> None:
        """Kills its whole worker (main process and pool) every time it runs."""
        n = attempt(app, self)
        record(app, self, "started", x=x, attempt=n)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    return app


app = install(build(make_app("orphans"))) if "CR_BROKER_URL" in os.environ else None
