"""A publish over ``reliable_max_payload_bytes`` raises PayloadTooLarge and sends nothing."""

from __future__ import annotations

import pytest
import redis

from celery_reliable import DeadLetterStore, PayloadTooLarge
from celery_reliable.testing import wait_for
from tests.apps import basic
from tests.apps.common import events

LIMIT = 1000


def test_oversized_publish_raises_and_sends_nothing(ns):
    app = ns.app(basic.build, reliable_max_payload_bytes=LIMIT)
    broker = redis.Redis.from_url(ns.broker_url)
    queue_key = f"{ns.broker_keyprefix}{ns.queue}"
    ok = app.tasks["basic.sleep"]

    ok.delay(0, "x" * (LIMIT // 2))  # under the limit: sent
    assert broker.llen(queue_key) == 1

    with pytest.raises(PayloadTooLarge) as info:
        ok.delay(0, "x" * LIMIT)
    assert info.value.limit == LIMIT and info.value.size > LIMIT
    assert info.value.task_name == "basic.sleep"
    assert "reliable_max_payload_bytes=1000" in str(info.value)
    with pytest.raises(PayloadTooLarge):
        ok.apply_async((0,), {"tag": "y" * LIMIT})
    with pytest.raises(PayloadTooLarge):
        ok.apply_async(args=[0], kwargs={"tag": "é" * (LIMIT // 2 + 1)})  # bytes, not chars
    assert broker.llen(queue_key) == 1
    assert issubclass(PayloadTooLarge, ValueError)


def test_retry_too_large_to_publish_is_dead_lettered_not_requeued_forever(ns, start_worker):
    """A task that came in through send_task (no size check) and then retries: the retry
    publish raises PayloadTooLarge. Requeueing would loop forever; it is dead-lettered."""
    app = ns.app(basic.build)
    start_worker("basic", env={"CELERY_RELIABLE_MAX_PAYLOAD_BYTES": str(LIMIT)})
    big = "x" * (2 * LIMIT)
    result = app.send_task("basic.flaky", args=[big])
    store = DeadLetterStore(app)
    wait_for(lambda: store.count() == 1, 30, message="the dead letter")
    entry = store.get(result.id)
    assert entry.reason == "payload_too_large"
    assert entry.exception == "celery_reliable.errors.PayloadTooLarge"
    assert entry.args == [big]
    assert len(events(app, "started")) == 1
