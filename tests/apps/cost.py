"""A test app for counting the store's round trips: one no-op ReliableTask per combination
of features. Each task counts itself on the broker's Redis (``CR_COUNT_URL``), never on the
coordination store whose traffic the test measures."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app

#: A rate far above what the test publishes: the bucket is consulted but never binds.
UNBINDING_RATE = "100000/s"
#: Failures before the failing breaker would open: never, in the test.
NEVER_OPENS = 1_000_000

#: name -> task options, every combination the round-trip test counts.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "ordered": {"ordering_key": "key"},
    "rate": {"global_rate_limit": UNBINDING_RATE},
    "breaker": {"breaker": "cost-ok"},
    "every": {"ordering_key": "key", "global_rate_limit": UNBINDING_RATE, "breaker": "cost-ok"},
}
#: Every feature, and the body fails (dead_letter=False: no dead-letter write), so the end
#: also reports the failure to the breaker.
FAILING = {
    "ordering_key": "key",
    "global_rate_limit": UNBINDING_RATE,
    "breaker": "cost-failing",
    "breaker_fail_max": NEVER_OPENS,
    "dead_letter": False,
}


def count_key(app: Celery) -> str:
    return f"{app.conf.reliable_key_prefix}:test:done"


def _done(app: Celery) -> None:
    client = redis.Redis.from_url(os.environ.get("CR_COUNT_URL") or app.conf.broker_url)
    client.incr(count_key(app))


def build(app: Celery) -> Celery:
    for combo, options in COMBINATIONS.items():

        def body(self: Any, i: int, key: str) -> None:
            _done(app)

        app.task(base=ReliableTask, bind=True, shared=False, name=f"cost.{combo}", **options)(body)

    @app.task(base=ReliableTask, bind=True, shared=False, name="cost.failing", **FAILING)
    def failing(self: Any, i: int, key: str) -> None:
        _done(app)
        raise RuntimeError("expected failure")

    return app


app = install(build(make_app("cost"))) if "CR_BROKER_URL" in os.environ else None
