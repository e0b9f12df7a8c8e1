"""Fixtures shared by the suite: a private Redis per session, a namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_reliable.testing import RedisServer, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Namespace:
    """One test's private corner of the shared Redis: key prefix, queue, broker keys."""

    redis: RedisServer
    prefix: str
    queue: str
    broker_url: str
    redis_url: str
    broker_keyprefix: str
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a worker subprocess running one of tests/apps."""
        return {
            "CR_BROKER_URL": self.broker_url,
            "CR_REDIS_URL": self.redis_url,
            "CR_PREFIX": self.prefix,
            "CR_QUEUE": self.queue,
            "CR_BROKER_KEYPREFIX": self.broker_keyprefix,
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
            **extra,
        }

    def app(self, build: Callable[[Celery], Celery], name: str = "producer", **conf: Any) -> Celery:
        """The same app the workers run, built in this process (to publish and inspect)."""
        from tests.apps.common import install, make_app

        return install(
            build(
                make_app(
                    name,
                    self.broker_url,
                    self.redis_url,
                    self.prefix,
                    self.queue,
                    broker_keyprefix=self.broker_keyprefix,
                    **conf,
                )
            )
        )


def new_namespace(server: RedisServer, store_url: str | None = None, **env: str) -> Namespace:
    """A fresh namespace on ``server`` (the broker); the store is db 1 of it by default, or
    ``store_url`` (a cluster, Sentinel); ``env`` goes to every worker."""
    tag = uuid.uuid4().hex[:10]
    if not server.running:  # a fault test may have left it stopped
        server.start()
    return Namespace(
        redis=server,
        prefix=f"t{tag}",
        queue=f"q{tag}",
        broker_url=server.url(0),
        redis_url=store_url or server.url(1),
        broker_keyprefix=f"b{tag}:",
        extra_env=dict(env),
    )


@pytest.fixture
def ns(reliable_redis_server: RedisServer) -> Namespace:
    return new_namespace(reliable_redis_server)


@pytest.fixture
def start_worker(
    ns: Namespace, reliable_worker_factory: Callable[..., WorkerProcess]
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a worker of a tests/apps module in the test's namespace and wait until ready."""

    def start(
        module: str,
        name: str = "w1",
        concurrency: int = 2,
        wait: bool = True,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> WorkerProcess:
        worker = reliable_worker_factory(
            f"tests.apps.{module}:app",
            name=name,
            queues=[ns.queue],
            concurrency=concurrency,
            env=ns.env(**(env or {})),
            cwd=str(ROOT),
            **kwargs,
        )
        if wait:
            worker.wait_ready()
        return worker

    yield start
