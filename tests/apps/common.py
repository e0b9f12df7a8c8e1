"""Shared by the test apps: an app built from environment variables, and event recording.

A test sets ``CR_BROKER_URL``, ``CR_REDIS_URL``, ``CR_PREFIX`` and ``CR_QUEUE`` for the
worker subprocess, and builds the same app in-process with :func:`make_app` to publish and
to read results. Tasks record what happened (``started``, ``succeeded``...) in a Redis list
so a test can account for every task id.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

import celery_reliable
from celery_reliable.core.store import make_client


def make_app(
    name: str,
    broker_url: str | None = None,
    redis_url: str | None = None,
    prefix: str | None = None,
    queue: str | None = None,
    broker_keyprefix: str | None = None,
    **conf: Any,
) -> Celery:
    broker_url = broker_url or os.environ["CR_BROKER_URL"]
    redis_url = redis_url or os.environ["CR_REDIS_URL"]
    prefix = prefix or os.environ["CR_PREFIX"]
    queue = queue or os.environ["CR_QUEUE"]
    if broker_keyprefix is None:
        broker_keyprefix = os.environ.get("CR_BROKER_KEYPREFIX", "")
    transport_options: dict[str, Any] = dict(conf.pop("broker_transport_options", {}))
    if broker_keyprefix and broker_url.startswith("redis"):
        transport_options.setdefault("global_keyprefix", broker_keyprefix)
    if os.environ.get("CR_VISIBILITY_TIMEOUT"):
        # A short visibility timeout, swept every second (kombu's default sweep is ~100 s).
        transport_options["visibility_timeout"] = float(os.environ["CR_VISIBILITY_TIMEOUT"])
        transport_options["unacked_restore_interval"] = 1
        transport_options["unacked_restore_throttle"] = 1
    app = Celery(name, broker=broker_url)
    app.conf.broker_transport_options = transport_options
    app.conf.update(
        task_default_queue=queue,
        reliable_redis_url=redis_url,
        reliable_key_prefix=prefix,
        worker_prefetch_multiplier=int(os.environ.get("CR_PREFETCH", "4")),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        result_backend=None,
        task_ignore_result=True,
        **conf,
    )
    return app


def recorder(app: Celery) -> redis.Redis:
    """The client tasks record events with: the coordination store (any topology), or
    ``CR_RECORD_URL`` when set (a test that fails the store over records elsewhere)."""
    client = getattr(app, "_test_recorder", None)
    if client is None or getattr(app, "_test_recorder_pid", None) != os.getpid():
        url = os.environ.get("CR_RECORD_URL") or app.conf.reliable_redis_url
        master = os.environ.get("CELERY_RELIABLE_REDIS_SENTINEL_MASTER")
        client = make_client(url, master if url.startswith("sentinel") else None)
        app._test_recorder = client  # type: ignore[attr-defined]
        app._test_recorder_pid = os.getpid()  # type: ignore[attr-defined]
    return client


def events_key(app: Celery) -> str:
    return f"{app.conf.reliable_key_prefix}:test:events"


def record(app: Celery, task: Any, event: str, **extra: Any) -> None:
    """Append one event of the running task to the test's event list."""
    entry = {
        "id": task.request.id,
        "task": task.name,
        "event": event,
        "pid": os.getpid(),
        "hostname": task.request.hostname,
        "t": time.time(),
        "retries": task.request.retries,
        **extra,
    }
    recorder(app).rpush(events_key(app), json.dumps(entry))


def events(app: Celery, event: str | None = None) -> list[dict[str, Any]]:
    """Every recorded event (optionally of one kind), in order."""
    raw = recorder(app).lrange(events_key(app), 0, -1)
    out = [json.loads(r) for r in raw]
    return [e for e in out if event is None or e["event"] == event]


def install(app: Celery) -> Celery:
    celery_reliable.install(app)
    return app
