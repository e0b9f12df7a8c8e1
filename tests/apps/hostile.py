"""A test app for hostile input: a task that takes anything, and two ordered tasks whose
(group, key) pairs would share one ordering line under a naive key encoding."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record

#: The custom header the fuzz test marks each message with.
MARK = "x-fuzz"


#: Task options a test can give the task ``hostile.bad`` (``CR_BAD_OPTIONS=<name>``).
BAD_OPTIONS: dict[str, dict[str, Any]] = {
    "not_a_tuple": {"dead_letter_for": ValueError},
    "typo": {"ordering_kye": "n"},
}


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="hostile.sink")
    def sink(self: Any, *args: Any, **kwargs: Any) -> None:
        """Runs with any arguments; records the message's mark."""
        mark = (self.request.headers or {}).get(MARK)
        record(app, self, "ran", mark=mark if isinstance(mark, str) else None)

    @app.task(base=ReliableTask, bind=True, shared=False, name="hostile.good")
    def good(self: Any, n: int) -> int:
        record(app, self, "succeeded", n=n)
        return n

    for suffix, group in (("x", "x"), ("xa", "x:a")):
        ordered(app, f"hostile.ordered_{suffix}", group)

    bad = os.environ.get("CR_BAD_OPTIONS")  # a task with the bad options named there
    if bad:

        def bad_task(n: int) -> None: ...

        app.task(base=ReliableTask, shared=False, name="hostile.bad", **BAD_OPTIONS[bad])(bad_task)
    return app


def ordered(app: Celery, name: str, group: str) -> None:
    """An ordered task of ``group`` that records its start and end and may pause."""

    def run(self: Any, key: Any, pause: float = 0.0) -> None:
        record(app, self, "started", group=group, key=repr(key))
        time.sleep(pause)
        record(app, self, "ended", group=group, key=repr(key))

    options = {"ordering_key": "key", "ordering_group": group}
    app.task(base=ReliableTask, bind=True, shared=False, name=name, **options)(run)


app = install(build(make_app("hostile"))) if "CR_BROKER_URL" in os.environ else None
