"""A test app for Celery features used through ReliableTask: pydantic models, Task.replace."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record

#: The shared bucket of ``cf.step``: one start a second, so replacements get deferred.
STEP_RATE = "1/s"


class Pair(BaseModel):
    """A pydantic model argument."""

    x: int
    y: int


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, shared=False, name="cf.add_pair", pydantic=True)
    def add_pair(pair: Pair) -> int:
        record(app, app.current_task, "added", total=pair.x + pair.y, kind=type(pair).__name__)
        return pair.x + pair.y

    @app.task(
        base=ReliableTask, bind=True, shared=False, name="cf.step", global_rate_limit=STEP_RATE
    )
    def step(self: Any, n: int) -> Any:
        record(app, self, "started", n=n)
        if n > 0:
            return self.replace(step.s(n - 1))
        record(app, self, "done", n=n)
        return "done"

    return app


app = install(build(make_app("celeryfeatures"))) if "CR_BROKER_URL" in os.environ else None
