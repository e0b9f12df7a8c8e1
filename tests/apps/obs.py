"""A test app that makes every worker metric family move: successes, a dead letter,
rate-limit, breaker and ordering deferrals."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record

#: A bucket that defers all but the first of a burst (one token, refilled 5 times a second).
RATE, BURST = "5/s", 1
#: A breaker that opens at the first failure and stays open through the test.
BREAKER, FAIL_MAX, RESET_TIMEOUT = "obs-vendor", 1, 300.0


class VendorDown(Exception):
    """The guarded dependency failed."""


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="obs.ok")
    def ok(self: Any, i: int) -> int:
        record(app, self, "succeeded", i=i)
        return i

    @app.task(
        base=ReliableTask, bind=True, shared=False, name="obs.bad", dead_letter_for=(ValueError,)
    )
    def bad(self: Any, i: int) -> None:
        raise ValueError(f"bad input {i}: this sentence is long enough to be cut in a listing")

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="obs.limited",
        global_rate_limit=RATE,
        global_rate_burst=BURST,
    )
    def limited(self: Any, i: int) -> int:
        record(app, self, "limited", i=i)
        return i

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="obs.per_tenant",
        global_rate_limit=RATE,
        global_rate_burst=BURST,
        global_rate_key=lambda order, **kw: order["tenant"],  # KeyError without a tenant
    )
    def per_tenant(self: Any, order: dict[str, Any]) -> None:
        record(app, self, "per_tenant")

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="obs.trickle",
        global_rate_limit="1/m",
        global_rate_burst=1,
    )
    def trickle(self: Any, i: int) -> int:
        record(app, self, "trickle", i=i)
        return i

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="obs.guarded",
        breaker=BREAKER,
        breaker_fail_max=FAIL_MAX,
        breaker_reset_timeout=RESET_TIMEOUT,
        dead_letter=False,
    )
    def guarded(self: Any, i: int) -> None:
        record(app, self, "guarded", i=i)
        raise VendorDown(f"vendor down ({i})")

    @app.task(base=ReliableTask, bind=True, shared=False, name="obs.ordered", ordering_key="key")
    def ordered(self: Any, key: str, i: int, seconds: float = 0.0) -> int:
        time.sleep(seconds)
        record(app, self, "ordered", key=key, i=i)
        return i

    @app.task(base=ReliableTask, bind=True, shared=False, name="obs.slow")
    def slow(self: Any, seconds: float) -> float:
        record(app, self, "slow_started")
        time.sleep(seconds)
        record(app, self, "slow_done")
        return seconds

    return app


app = install(build(make_app("obs-worker"))) if "CR_BROKER_URL" in os.environ else None
