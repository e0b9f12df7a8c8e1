"""A test app for reliable fetch: a plain Celery task and a ReliableTask that count runs.

Each run adds one to ``<prefix>:test:runs`` (a HASH task id -> runs) when it finishes, so
a test can account for every published id; ``fetch.hold`` records its start and then
sleeps, so a test can kill or pause the worker running it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record, recorder


def runs_key(app: Celery) -> str:
    return f"{app.conf.reliable_key_prefix}:test:runs"


def build(app: Celery) -> Celery:
    @app.task(bind=True, shared=False, name="fetch.plain", acks_late=True)
    def plain(self: Any, i: int) -> int:
        recorder(app).hincrby(runs_key(app), self.request.id, 1)
        return i

    @app.task(base=ReliableTask, bind=True, shared=False, name="fetch.reliable")
    def reliable(self: Any, i: int) -> int:
        recorder(app).hincrby(runs_key(app), self.request.id, 1)
        return i

    @app.task(base=ReliableTask, bind=True, shared=False, name="fetch.hold")
    def hold(self: Any, seconds: float) -> None:
        record(app, self, "started")
        time.sleep(seconds)
        record(app, self, "succeeded")

    return app


app = install(build(make_app("fetch"))) if "CR_BROKER_URL" in os.environ else None
