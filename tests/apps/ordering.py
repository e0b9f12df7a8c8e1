"""A test app with ordered ReliableTasks: steps, flaky steps, doomed steps, bench tasks."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from celery_reliable.ordering.extension import HEADER
from tests.apps.common import install, make_app, record, recorder


class FlakyError(IOError):
    """A failure worth retrying."""


class PermanentError(Exception):
    """A failure that retrying cannot fix."""


def seq_of(task: Any) -> int | None:
    place = (task.request.headers or {}).get(HEADER)
    return int(place[2]) if place else None


#: Longest hold of a step published with a negative pause.
HOLD_LIMIT = 120.0


def release_key(app: Celery) -> str:
    """Set it to let held steps (negative pause) end."""
    return f"{app.conf.reliable_key_prefix}:test:release"


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="ordering.step", ordering_key="key")
    def step(self: Any, key: str, n: int, pause: float = 0.0) -> int:
        """Sleeps ``pause`` seconds; a negative pause holds the step until the test sets
        :func:`release_key` (at most ``HOLD_LIMIT`` s), so a kill surely interrupts it."""
        record(app, self, "started", key=key, n=n, seq=seq_of(self))
        if pause < 0:
            deadline = time.monotonic() + HOLD_LIMIT
            while not recorder(app).exists(release_key(app)) and time.monotonic() < deadline:
                time.sleep(0.02)
        elif pause:
            time.sleep(pause)
        record(app, self, "ended", key=key, n=n, seq=seq_of(self))
        return n

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="ordering.flaky",
        ordering_key="key",
        ordering_group="ordering.step",
        max_retries=5,
        autoretry_for=(FlakyError,),
        retry_backoff=False,
        default_retry_delay=0,
    )
    def flaky(self: Any, key: str, n: int, failures: int) -> int:
        record(app, self, "started", key=key, n=n, seq=seq_of(self))
        attempt = recorder(app).incr(f"{app.conf.reliable_key_prefix}:test:attempts:{key}:{n}")
        if attempt <= failures:
            record(app, self, "failed", key=key, n=n, seq=seq_of(self))
            raise FlakyError(f"attempt {attempt} of {key}#{n}")
        record(app, self, "ended", key=key, n=n, seq=seq_of(self))
        return n

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="ordering.doomed",
        ordering_key=lambda key, n: key,
        ordering_group="ordering.step",
        dead_letter_for=(PermanentError,),
    )
    def doomed(self: Any, key: str, n: int) -> None:
        record(app, self, "started", key=key, n=n, seq=seq_of(self))
        record(app, self, "ended", key=key, n=n, seq=seq_of(self))
        raise PermanentError(f"{key}#{n} cannot be processed")

    # --- benchmark tasks: same body, three ways (plain Celery, ReliableTask, ordered) ---

    def bump(kind: str) -> None:
        recorder(app).incr(f"{app.conf.reliable_key_prefix}:bench:{kind}")

    @app.task(shared=False, name="bench.plain")
    def plain(key: str) -> None:
        bump("plain")

    @app.task(base=ReliableTask, shared=False, name="bench.reliable")
    def reliable(key: str) -> None:
        bump("reliable")

    @app.task(base=ReliableTask, shared=False, name="bench.ordered", ordering_key="key")
    def ordered(key: str) -> None:
        bump("ordered")

    @app.task(base=ReliableTask, bind=True, shared=False, name="bench.hot", ordering_key="key")
    def hot(self: Any, key: str, n: int) -> None:
        client = recorder(app)
        client.rpush(f"{app.conf.reliable_key_prefix}:bench:hot", f"s {n} {time.time()}")
        client.rpush(f"{app.conf.reliable_key_prefix}:bench:hot", f"e {n} {time.time()}")

    return app


app = install(build(make_app("ordering"))) if "CR_BROKER_URL" in os.environ else None
