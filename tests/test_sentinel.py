"""The coordination store behind Redis Sentinel, failing over mid-run.

A master, its replica and one Sentinel (``redis-server --sentinel``) are started by the
``reliable_redis_sentinel`` fixture; the store is ``sentinel://...`` with
``reliable_redis_sentinel_master`` (given to the workers as ``CELERY_RELIABLE_*``). The
broker stays the session's redis-server, and the tasks record what they did there too, so
the record survives the failover. While two real workers run tasks and a reaper runs its
passes, the master is killed with ``kill -9``; Sentinel promotes the replica; the workers
and the reaper carry on against the new master, and every published task is accounted
for. Select with ``pytest -m sentinel``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_reliable import DeadLetterStore
from celery_reliable.orphans.registry import live_workers
from celery_reliable.testing import ReaperProcess, RedisSentinelSetup, RedisServer, wait_for
from tests.apps import basic
from tests.apps.common import events
from tests.conftest import ROOT, Namespace, new_namespace

pytestmark = pytest.mark.sentinel

#: Settings of the workers and the reaper: a worker silent for 10 s is dead, so the
#: failover (a few seconds) must not make the reaper take live workers' tasks.
SETTINGS = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "1",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "10",
    "CELERY_RELIABLE_REAPER_INTERVAL": "1",
}
TASKS = 80


@pytest.fixture
def ns(
    reliable_redis_server: RedisServer,
    reliable_redis_sentinel: RedisSentinelSetup,
    monkeypatch: pytest.MonkeyPatch,
) -> Namespace:
    sentinel = reliable_redis_sentinel
    env = {
        "CELERY_RELIABLE_REDIS_SENTINEL_MASTER": sentinel.master_name,
        "CR_RECORD_URL": reliable_redis_server.url(2),
    }
    for name, value in env.items():  # this process builds the same app
        monkeypatch.setenv(name, value)
    return new_namespace(reliable_redis_server, sentinel.url(1), **env, **SETTINGS)


@pytest.fixture
def reaper(ns: Namespace, tmp_path: Path) -> Iterator[Callable[[], ReaperProcess]]:
    started: list[ReaperProcess] = []

    def start() -> ReaperProcess:
        proc = ReaperProcess(
            "tests.apps.basic:app", env=ns.env(), log_path=tmp_path / "reaper.log", cwd=str(ROOT)
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def test_store_fails_over_and_every_task_is_accounted_for(
    ns, start_worker, reaper, reliable_redis_sentinel
):
    sentinel = reliable_redis_sentinel
    app = ns.app(basic.build)
    workers = [start_worker("basic", name=n, wait=False) for n in ("w1", "w2")]
    for w in workers:
        w.wait_ready()
    reaping = reaper().wait_started()
    ids, failing = [], []
    for i in range(TASKS):
        ids.append(app.tasks["basic.sleep"].delay(0.1, str(i)).id)
        if i % 10 == 5:  # a few fail for good: their dead letters must survive too
            failing.append(app.tasks["basic.permanent"].delay(i).id)
    wait_for(lambda: len(events(app, "succeeded")) >= TASKS // 4, 60, message="a quarter done")

    sentinel.kill_master()
    killed = time.time()
    sentinel.wait_promoted()
    promoted = time.time()
    print(f"\nreplica promoted {promoted - killed:.1f}s after kill -9 of the master")

    def missing() -> set[str]:
        return set(ids) - {e["id"] for e in events(app, "succeeded")}

    wait_for(lambda: not missing(), 90, message=lambda: f"{len(missing())} tasks to succeed")
    after = [e for e in events(app, "started") if e["t"] > promoted]
    assert after, "the run went on past the failover (tasks started on the new master)"
    assert all(w.alive for w in workers) and reaping.proc.poll() is None
    # both workers beat against the new master again; the reaper read them (no false reap)
    nodes = sorted(w.nodename for w in workers)
    wait_for(
        lambda: sorted(w["node"] for w in live_workers(app) if w["alive"]) == nodes,
        30,
        message="both workers registered on the promoted master",
    )
    dlq = DeadLetterStore(app)
    wait_for(lambda: dlq.count() == len(failing), 30, message="every failing task dead-lettered")
    assert sorted(e.id for e in dlq.list(limit=None)) == sorted(failing)
    assert "reaper: pass failed" not in reaping.log() or "passes succeed again" in reaping.log()
    logs = "".join(w.log() for w in workers)
    assert "declared DEAD" not in logs
    print(f"{len(after)} tasks started after the promotion; worker log lines about the store:")
    print("\n".join(ln for ln in logs.splitlines() if "heartbeat" in ln or "Redis" in ln))
