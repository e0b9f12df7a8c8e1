"""A test app for graceful drain: long ReliableTasks, a task longer than the drain timeout
the first time it runs, and a plain (not acks_late) task."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record, recorder


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="drain.sleep")
    def sleep(self: Any, seconds: float, tag: str = "") -> str:
        record(app, self, "started", tag=tag)
        time.sleep(seconds)
        record(app, self, "succeeded", tag=tag)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="drain.long_once")
    def long_once(self: Any, first: float, later: float, tag: str = "") -> str:
        """Sleeps ``first`` seconds on its first run and ``later`` on every other run."""
        n = recorder(app).incr(f"{app.conf.reliable_key_prefix}:test:runs:{self.request.id}")
        record(app, self, "started", tag=tag, run=n)
        time.sleep(first if n == 1 else later)
        record(app, self, "succeeded", tag=tag, run=n)
        return tag

    @app.task(base=ReliableTask, bind=True, shared=False, name="drain.limited", rate_limit="1/m")
    def limited(self: Any, tag: str = "") -> str:
        """Celery's per-worker rate limit: after the first, requests wait in a bucket."""
        record(app, self, "started", tag=tag)
        record(app, self, "succeeded", tag=tag)
        return tag

    @app.task(bind=True, shared=False, name="drain.plain_late", acks_late=True)
    def plain_late(self: Any, first: float, later: float) -> None:
        """A plain acks_late task (no reject_on_worker_lost), long on its first run."""
        n = recorder(app).incr(f"{app.conf.reliable_key_prefix}:test:runs:{self.request.id}")
        record(app, self, "started", run=n)
        time.sleep(first if n == 1 else later)
        record(app, self, "succeeded", run=n)

    @app.task(bind=True, shared=False, name="drain.plain")
    def plain(self: Any, seconds: float, tag: str = "") -> str:
        """A plain Celery task (acked when it starts)."""
        record(app, self, "started", tag=tag)
        time.sleep(seconds)
        record(app, self, "succeeded", tag=tag)
        return tag

    return app


app = install(build(make_app("drain"))) if "CR_BROKER_URL" in os.environ else None
