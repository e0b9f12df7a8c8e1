"""A test app with ReliableTasks that succeed, fail, retry and dead-letter."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app, record, recorder


class PermanentError(Exception):
    """A failure that retrying cannot fix."""


class FlakyError(IOError):
    """A failure worth retrying."""


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, bind=True, shared=False, name="basic.ok")
    def ok(self: Any, x: int) -> int:
        record(app, self, "started", x=x)
        record(app, self, "succeeded", x=x)
        return x

    @app.task(base=ReliableTask, bind=True, shared=False, name="basic.sleep")
    def sleep(self: Any, seconds: float, tag: str = "") -> str:
        record(app, self, "started", tag=tag)
        time.sleep(seconds)
        record(app, self, "succeeded", tag=tag)
        return tag

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.flaky",
        max_retries=2,
        autoretry_for=(FlakyError,),
        retry_backoff=False,
        default_retry_delay=0,
    )
    def flaky(self: Any, x: int) -> None:
        record(app, self, "started", x=x)
        raise FlakyError(f"flaky failure {x}")

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.fails_then_ok",
        max_retries=5,
        autoretry_for=(FlakyError,),
        default_retry_delay=0,
    )
    def fails_then_ok(self: Any, key: str, failures: int) -> str:
        record(app, self, "started", key=key)
        n = recorder(app).incr(f"{app.conf.reliable_key_prefix}:test:attempts:{key}")
        if n <= failures:
            raise FlakyError(f"attempt {n} of {key}")
        record(app, self, "succeeded", key=key)
        return key

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.permanent",
        max_retries=5,
        autoretry_for=(IOError,),
        dead_letter_for=(PermanentError,),
        default_retry_delay=0,
    )
    def permanent(self: Any, x: int, note: str = "") -> None:
        record(app, self, "started", x=x)
        raise PermanentError(f"cannot process {x}")

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.pause_then_fail",
        dead_letter_for=(PermanentError,),
    )
    def pause_then_fail(self: Any, x: int) -> None:
        """Fails for good; pauses in on the way out so a test can kill the worker between
        the dead-letter write and the ack (see test_deadletter)."""
        record(app, self, "started", x=x)
        raise PermanentError(f"pause then fail {x}")

    @app.task(base=ReliableTask, bind=True, shared=False, name="basic.header_type")
    def header_type(self: Any) -> None:
        """Records the type of its ``x-when`` header as the worker decoded it."""
        when = (self.request.headers or {}).get("x-when")
        record(app, self, "header_type", type=type(when).__name__)

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.until_fixed",
        dead_letter_for=(PermanentError,),
    )
    def until_fixed(self: Any, key: str, n: int = 0) -> str:
        """Fails for good until the Redis flag ``<prefix>:test:fixed:<key>`` is set (the
        dead-letter/replay tests set it, then replay)."""
        headers = self.request.headers or {}
        seen = {"replayed_from": headers.get("x-reliable-replayed-from")}
        seen["tenant"] = headers.get("x-tenant")
        record(app, self, "started", key=key, n=n, **seen)
        if not recorder(app).exists(fixed_key(app, key)):
            raise PermanentError(f"{key} is not fixed yet")
        record(app, self, "succeeded", key=key, n=n, **seen)
        return key

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="basic.fail_quietly",
        dead_letter_for=(PermanentError,),
    )
    def fail_quietly(self: Any, x: int) -> None:
        """Fails for good without touching Redis itself (for Redis-outage tests)."""
        raise PermanentError(f"quiet failure {x}")

    return app


def fixed_key(app: Celery, key: str) -> str:
    """The flag that makes ``basic.until_fixed(key)`` succeed."""
    return f"{app.conf.reliable_key_prefix}:test:fixed:{key}"


# The worker's app (`celery -A tests.apps.basic:app`), built only where a test configured
# the environment; tests import `build` and make their own producer app.
app = install(build(make_app("basic"))) if "CR_BROKER_URL" in os.environ else None

# A hook for the crash-between-write-and-ack test: when CR_PAUSE_AFTER_DLQ is set, the pool
# process records that the dead letter was written and then sleeps before returning (so
# before the main process acks), giving the test a window to kill -9 the worker.
if app is not None and os.environ.get("CR_PAUSE_AFTER_DLQ"):
    from celery_reliable.deadletters.store import DeadLetterStore

    _original_add = DeadLetterStore.add

    def _add_then_pause(self: DeadLetterStore, entry: Any) -> bool:
        added = _original_add(self, entry)
        recorder(app).rpush(f"{app.conf.reliable_key_prefix}:test:dlq_written", entry.id)
        time.sleep(float(os.environ["CR_PAUSE_AFTER_DLQ"]))
        return added

    DeadLetterStore.add = _add_then_pause  # type: ignore[method-assign]
