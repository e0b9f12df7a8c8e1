"""Guarantee 1 (nothing lost), end to end: a mixed workload through real prefork workers
while one is kill -9'ed and another drained with SIGTERM, with the reaper running.

Every published id must end exactly once as succeeded or dead-lettered. The only duplicate
allowed is the at-least-once re-run of a task whose first run was on the killed worker.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from celery_reliable import DeadLetterStore
from celery_reliable.testing import ReaperProcess, wait_for
from tests.apps import basic
from tests.apps.common import events
from tests.conftest import ROOT, Namespace

#: Small liveness settings so the reaper acts within seconds.
FAST = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "0.5",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "3",
    "CELERY_RELIABLE_REAPER_INTERVAL": "0.5",
    "CELERY_RELIABLE_DRAIN_TIMEOUT": "10",
}
SLEEPS, OKS, FAILURES = 120, 40, 20


@pytest.fixture
def reaper(ns: Namespace, tmp_path: Path) -> Iterator[ReaperProcess]:
    proc = ReaperProcess(
        "tests.apps.basic:app",
        env=ns.env(**FAST),
        log_path=tmp_path / "reaper.log",
        cwd=str(ROOT),
    )
    try:
        yield proc.wait_started()
    finally:
        proc.close()


def test_every_task_ends_exactly_once_through_a_crash_and_a_drain(
    ns: Namespace, start_worker: Callable[..., object], reaper: ReaperProcess
) -> None:
    app = ns.app(basic.build)
    workers = [start_worker("basic", name=f"w{i}", env=FAST, wait=False) for i in range(3)]
    for w in workers:
        w.wait_ready()  # type: ignore[attr-defined]
    rng = random.Random(7)
    expected_ok, expected_dead = set(), set()
    jobs = ["sleep"] * SLEEPS + ["ok"] * OKS + ["fail"] * FAILURES
    rng.shuffle(jobs)
    for i, job in enumerate(jobs):
        if job == "sleep":
            expected_ok.add(app.tasks["basic.sleep"].delay(rng.uniform(0.02, 0.3), str(i)).id)
        elif job == "ok":
            expected_ok.add(app.tasks["basic.ok"].delay(i).id)
        else:
            expected_dead.add(app.tasks["basic.permanent"].delay(i).id)

    def started() -> int:
        return len({e["id"] for e in events(app, "started")})

    wait_for(lambda: started() >= len(jobs) // 4, 60, message="a quarter started")
    victim, drained, survivor = workers  # type: ignore[misc]
    killed_at = time.time()
    victim.kill9()
    wait_for(lambda: started() >= len(jobs) // 2, 60, message="half started")
    drained.terminate()
    assert drained.wait_exit(30) == 0, drained.log()[-3000:]
    start_worker("basic", name="w3", env=FAST)

    store = DeadLetterStore(app)

    def finished() -> bool:
        done = {e["id"] for e in events(app, "succeeded")}
        return expected_ok <= done and store.count() >= len(expected_dead)

    def diagnose() -> str:
        done = {e["id"] for e in events(app, "succeeded")}
        missing = (expected_ok - done) | (expected_dead - {e.id for e in store.list(limit=None)})
        broker = redis.Redis.from_url(ns.broker_url, decode_responses=True)
        unacked = broker.hgetall(f"{ns.broker_keyprefix}unacked")
        index = dict(broker.zrange(f"{ns.broker_keyprefix}unacked_index", 0, -1, withscores=True))
        lines = [f"missing {len(missing)}; unacked {len(unacked)}; killed at {killed_at:.2f}"]
        for i in missing:
            runs = [
                (e["hostname"], e["event"], round(e["t"], 2)) for e in events(app) if e["id"] == i
            ]
            tags = [(t, index.get(t)) for t, v in unacked.items() if i in v]
            lines.append(f"  {i}: runs {runs} unacked {tags}")
        return "\n".join(lines) + "\n"

    wait_for(
        finished,
        90,
        message=lambda: f"every task to end: {diagnose()}{reaper.log()[-2000:]}",
    )

    succeeded = Counter(e["id"] for e in events(app, "succeeded"))
    dead = {e.id for e in store.list(limit=None)}
    assert set(succeeded) == expected_ok, "a task succeeded that should not have"
    assert dead == expected_dead, "dead letters are exactly the failing tasks"
    on_victim = {e["id"] for e in events(app, "started") if e["hostname"] == victim.nodename}
    twice = {i for i, n in succeeded.items() if n > 1}
    assert twice <= on_victim, f"duplicates not explained by the crash: {twice - on_victim}"
    assert all(n <= 2 for n in succeeded.values())
    # nothing is left behind on the broker
    broker = redis.Redis.from_url(ns.broker_url, decode_responses=True)
    wait_for(
        lambda: broker.hlen(f"{ns.broker_keyprefix}unacked") == 0,
        15,
        message="kombu's unacked set to empty",
    )
    assert broker.llen(f"{ns.broker_keyprefix}{ns.queue}") == 0
    assert survivor.alive  # type: ignore[attr-defined]
    print(
        f"\n{len(jobs)} tasks: {len(expected_ok)} succeeded, {len(dead)} dead-lettered, "
        f"{len(twice)} re-run after the kill -9 ({len(on_victim)} had started on the victim)"
    )
