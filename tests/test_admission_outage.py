"""Admission control when Redis goes away (reliable_fail_open), and bad options.

The coordination store is a server of the test's own, stopped once the worker has
registered (a worker does not consume before it has), while the broker stays up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_reliable.testing import RedisServer, wait_for
from tests.apps import admission
from tests.apps.common import events


@pytest.fixture
def store() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def test_fail_open_runs_tasks_without_limits_and_logs_it(ns, start_worker, store):
    app = ns.app(admission.build)
    worker = start_worker("admission", env={"CELERY_RELIABLE_REDIS_URL": store.url(0)})
    store.kill()
    ids = [app.tasks["adm.limited"].delay(i).id for i in range(10)]
    wait_for(lambda: len(events(app, "started")) >= 10, 30, message="10 starts")
    assert sorted(e["id"] for e in events(app, "started")) == sorted(ids)
    assert "Redis unreachable at start of adm.limited" in worker.log()
    assert "running it without rate limit or breaker" in worker.log()


def test_fail_closed_defers_tasks_and_logs_it(ns, start_worker, store):
    app = ns.app(admission.build)
    env = {"CELERY_RELIABLE_REDIS_URL": store.url(0), "CELERY_RELIABLE_FAIL_OPEN": "false"}
    worker = start_worker("admission", env=env)
    store.kill()
    for i in range(3):
        app.tasks["adm.limited"].delay(i)
    wait_for(lambda: worker.log().count(" ignored") >= 3, 30, message="3 deferrals")
    assert "deferring it 5 s (reliable_fail_open=False)" in worker.log()
    assert events(app, "started") == []


def test_worker_with_an_invalid_option_refuses_to_start(ns, start_worker):
    worker = start_worker("admission", wait=False, env={"CR_BAD_RATE": "lots"})
    assert worker.wait_exit(30) != 0
    assert "global_rate_limit: task 'adm.bad': expected 'N/s', 'N/m' or 'N/h'" in worker.log()
