"""A publish over ``reliable_max_payload_bytes`` raises PayloadTooLarge and sends nothing."""

from __future__ import annotations

import pytest
import redis

from celery_reliable import PayloadTooLarge
from tests.apps import basic

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
