"""Redis going away and coming back: scripts are re-loaded (NOSCRIPT), workers log and keep
running, and a task that fails while the store is down is not acked before its dead letter
is written (it is requeued and dead-lettered once Redis is back)."""

from __future__ import annotations

import dataclasses
import time

import redis

from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.testing import RedisServer, wait_for
from tests.apps import basic
from tests.apps.common import events


def entry(i: int) -> DeadLetter:
    return DeadLetter(id=f"e{i}", task_id=f"e{i}", task="basic.permanent", failed_at=time.time())


def test_dead_letter_write_survives_script_flush_and_a_redis_restart(ns):
    app = ns.app(basic.build)
    store = DeadLetterStore(app)
    assert store.add(entry(1))
    store.store.client.script_flush()
    assert store.add(entry(2))  # EVALSHA answered NOSCRIPT: the script was loaded again
    try:
        ns.redis.kill()  # kill -9: the data and the script cache are gone
        ns.redis.start()
        assert store.add(entry(3))  # the pooled connection is re-made, the script re-loaded
        assert [e.id for e in store.list(limit=None)] == ["e3"]
    finally:
        if not ns.redis.running:
            ns.redis.start()


def test_worker_survives_a_store_outage_and_dead_letters_after_it(ns, start_worker):
    """The coordination Redis (a second server, so the broker keeps its queue) is killed:
    a task failing meanwhile is requeued, not acked, and is dead-lettered exactly once when
    Redis is back; the worker logs the outage, stays up and keeps serving."""
    coord = RedisServer().start()
    try:
        ns = dataclasses.replace(ns, redis_url=coord.url(0))
        app = ns.app(basic.build)
        worker = start_worker("basic", env={"CR_REDIS_URL": coord.url(0)})
        coord.kill()
        failing = app.tasks["basic.fail_quietly"].delay(1)
        # the write fails, the message goes back to the broker and is tried again
        wait_for(
            lambda: worker.log().count("Could not write dead letter") >= 2,
            30,
            message=lambda: f"two failed dead-letter writes:\n{worker.log()[-3000:]}",
        )
        assert "requeueing the message" in worker.log()
        assert worker.alive
        coord.start()
        store = DeadLetterStore(app)
        wait_for(lambda: store.count() == 1, 30, message=lambda: worker.log()[-3000:])
        (dead,) = store.list(limit=None)
        assert dead.id == failing.id and dead.reason == "dead_letter_for"
        assert store.stats()["added"] == 1
        ok = app.tasks["basic.ok"].delay(5)
        wait_for(lambda: [e["id"] for e in events(app, "succeeded")] == [ok.id], 30)
        assert worker.alive
    finally:
        coord.close()


def test_a_short_store_blip_is_ridden_out_without_rerunning_the_task(ns, start_worker):
    """Redis back within the write patience (3 s): the pool process keeps trying, the dead
    letter is written, and the task is not requeued and run a second time."""
    coord = RedisServer().start()
    try:
        ns = dataclasses.replace(ns, redis_url=coord.url(0))
        app = ns.app(basic.build)
        worker = start_worker("basic", env={"CR_REDIS_URL": coord.url(0)})
        coord.kill()
        failing = app.tasks["basic.fail_quietly"].delay(2)
        worker.wait_log("Dead-letter store unreachable")
        coord.start()
        store = DeadLetterStore(app)
        wait_for(lambda: store.count() == 1, 30, message=lambda: worker.log()[-3000:])
        assert store.get(failing.id).reason == "dead_letter_for"
        assert worker.log().count(f"basic.fail_quietly[{failing.id}] received") == 1
        assert "requeueing the message" not in worker.log()
    finally:
        coord.close()


def test_worker_survives_a_broker_and_store_restart(ns, start_worker):
    """kill -9 of the one Redis that is both broker and store while a worker is idle: the
    worker reconnects and runs the next task; nothing of ours stops it."""
    app = ns.app(basic.build)
    worker = start_worker("basic")
    try:
        ns.redis.kill()
        worker.wait_log("Connection to broker lost")
        ns.redis.start()
    finally:
        if not ns.redis.running:
            ns.redis.start()
    result = app.tasks["basic.ok"].delay(3)
    wait_for(
        lambda: [e["id"] for e in events(app, "succeeded")] == [result.id],
        45,
        message=lambda: f"the task after the restart:\n{worker.log()[-3000:]}",
    )
    assert worker.alive
    assert redis.Redis.from_url(ns.redis_url).ping()
