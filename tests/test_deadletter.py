"""Guarantee 1 (dead letters): failed-for-good tasks land in the store, whole, before the ack."""

from __future__ import annotations

from celery_reliable import DeadLetterStore
from celery_reliable.testing import wait_for
from tests.apps import basic
from tests.apps.common import events, recorder

REQUIRED_FIELDS = {
    "id",
    "task_id",
    "task",
    "args",
    "kwargs",
    "queue",
    "reason",
    "exception",
    "error",
    "traceback",
    "retries",
    "hostname",
    "failed_at",
}


def test_exhausted_retries_are_dead_lettered_with_every_field(ns, start_worker):
    app = ns.app(basic.build)
    worker = start_worker("basic")
    result = app.tasks["basic.flaky"].delay(7)
    store = DeadLetterStore(app)
    wait_for(lambda: store.count() == 1, 30, message="one dead letter")
    entry = store.get(result.id)
    data = entry.to_dict()
    assert set(data) >= REQUIRED_FIELDS
    assert entry.task_id == result.id and entry.task == "basic.flaky"
    assert entry.args == [7] and entry.kwargs == {}
    assert entry.reason == "max_retries"
    assert entry.retries == 2
    assert entry.exception == "tests.apps.basic.FlakyError"
    assert entry.error == "flaky failure 7"
    assert "FlakyError" in entry.traceback
    assert entry.queue == ns.queue
    assert entry.hostname == worker.nodename
    assert entry.failed_at > 0
    # three runs: the first and two retries; then it stopped
    assert len(events(app, "started")) == 3


def test_dead_letter_for_skips_retries(ns, start_worker):
    app = ns.app(basic.build)
    start_worker("basic")
    result = app.tasks["basic.permanent"].apply_async(
        (3,), {"note": "n"}, headers={"x-tenant": "a"}
    )
    store = DeadLetterStore(app)
    wait_for(lambda: store.count() == 1, 30, message="one dead letter")
    entry = store.get(result.id)
    assert entry.reason == "dead_letter_for"
    assert entry.retries == 0
    assert entry.kwargs == {"note": "n"}
    assert entry.headers.get("x-tenant") == "a"
    assert len(events(app, "started")) == 1


def test_succeeding_task_leaves_no_dead_letter(ns, start_worker):
    app = ns.app(basic.build)
    start_worker("basic")
    ids = [app.tasks["basic.ok"].delay(i).id for i in range(20)]
    wait_for(lambda: len(events(app, "succeeded")) == 20, 30, message="20 successes")
    assert sorted(e["id"] for e in events(app, "succeeded")) == sorted(ids)
    assert DeadLetterStore(app).count() == 0


def test_kill_between_dead_letter_write_and_ack_leaves_one_entry(ns, start_worker):
    """Write, then ack: a worker killed in between runs the task again on redelivery, and
    the second write is a no-op because dead letters are idempotent by task id."""
    app = ns.app(basic.build)
    env = {"CR_PAUSE_AFTER_DLQ": "30", "CR_VISIBILITY_TIMEOUT": "1"}
    first = start_worker("basic", name="w1", env=env)
    result = app.tasks["basic.pause_then_fail"].delay(5)
    written = f"{ns.prefix}:test:dlq_written"
    wait_for(lambda: recorder(app).llen(written) == 1, 30, message="the dead-letter write")
    first.kill9()
    assert DeadLetterStore(app).count() == 1
    # A fresh worker restores the unacked message (visibility timeout of 1 s) and reruns it.
    start_worker("basic", name="w2", env={"CR_VISIBILITY_TIMEOUT": "1"})
    wait_for(lambda: len(events(app, "started")) == 2, 30, message="the redelivered run")
    wait_for(lambda: recorder(app).llen(written) >= 1 and len(events(app, "started")) == 2, 5)
    store = DeadLetterStore(app)
    assert [e.id for e in store.list(limit=None)] == [result.id]
    assert store.stats()["added"] == 1
