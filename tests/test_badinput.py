"""Guarantee 7 (bad input): undecodable, headerless and unknown-task messages on a reliable
worker's queue are dead-lettered (``malformed`` / ``unknown_task``) and the worker keeps
serving. Messages are published raw with kombu, as a buggy or foreign producer would."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from kombu import Connection

from celery_reliable import DeadLetterStore
from celery_reliable.testing import wait_for
from tests.apps import basic
from tests.apps.common import events
from tests.test_dlq_cli import cli


def publish_raw(ns: Any, body: bytes, headers: dict[str, Any] | None, **props: Any) -> None:
    """Put one message on the test's queue through kombu, bypassing Celery."""
    options = {"global_keyprefix": ns.broker_keyprefix}
    with Connection(ns.broker_url, transport_options=options) as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=ns.queue,
            headers=headers,
            content_type=props.pop("content_type", "application/json"),
            content_encoding="utf-8",
            **props,
        )


def v2_headers(task: str, task_id: str) -> dict[str, Any]:
    """The headers Celery's protocol 2 puts on a task message."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "test",
        "x-tenant": "acme",
    }


def test_bad_messages_are_dead_lettered_and_the_worker_keeps_serving(ns, start_worker):
    app = ns.app(basic.build)
    worker = start_worker("basic")
    store = DeadLetterStore(app)

    # 1. valid Celery v2 headers, a body that is not JSON (decoded in the consumer: DecodeError)
    bad_json_id = str(uuid.uuid4())
    publish_raw(ns, b"{not json at all", v2_headers("basic.ok", bad_json_id))
    # 2. no task headers, a JSON body that is no task either
    publish_raw(ns, json.dumps({"hello": "world"}).encode(), {})
    # 3. no task headers and a body that does not even decode
    publish_raw(ns, b"\xff\xfe garbage", {"x-source": "legacy"})
    # 4. a well-formed task message naming a task nobody registered
    unknown = app.send_task("basic.not_registered", args=[1, "a"], kwargs={"k": 2})
    # 5. headers of the wrong types: an unknown task with retries "abc", a task name that is
    #    a list (Celery's strategy lookup raises TypeError on it)
    odd_retries = str(uuid.uuid4())
    headers = {**v2_headers("basic.gone", odd_retries), "retries": "abc"}
    publish_raw(ns, json.dumps([[], {}, {}]).encode(), headers)
    odd_name = str(uuid.uuid4())
    headers = {**v2_headers("basic.ok", odd_name), "task": ["basic", "ok"]}
    publish_raw(ns, json.dumps([[], {}, {}]).encode(), headers)

    wait_for(lambda: store.count() == 6, 30, message=lambda: f"6 dead letters:\n{worker.log()}")
    entries = {e.id: e for e in store.list(limit=None)}
    odd = entries.pop(odd_retries)
    # checked before the task name is looked up: the wrong-typed header makes it malformed
    assert (odd.reason, odd.task, odd.retries) == ("malformed", "basic.gone", 0)
    odd = entries.pop(odd_name)
    assert (odd.reason, odd.task) == ("malformed", "['basic', 'ok']")

    bad_json = entries.pop(bad_json_id)
    assert bad_json.reason == "malformed"
    assert bad_json.task == "basic.ok" and bad_json.task_id == bad_json_id
    assert bad_json.body == "{not json at all"
    assert bad_json.queue == ns.queue
    assert bad_json.headers == {"x-tenant": "acme"}
    assert bad_json.exception and "DecodeError" in bad_json.exception
    assert bad_json.hostname == worker.nodename

    unknown_entry = entries.pop(unknown.id)
    assert unknown_entry.reason == "unknown_task"
    assert unknown_entry.task == "basic.not_registered"
    assert unknown_entry.args == [1, "a"] and unknown_entry.kwargs == {"k": 2}
    assert unknown_entry.queue == ns.queue

    # the two headerless messages have no task id: their ids are derived from the body
    rest = sorted(entries.values(), key=lambda e: e.body or "")
    assert [e.reason for e in rest] == ["malformed", "malformed"]
    assert all(e.id.startswith("msg-") and e.task is None for e in rest)
    assert {e.body for e in rest} == {'{"hello": "world"}', "\ufffd\ufffd garbage"}
    assert any(e.headers == {"x-source": "legacy"} for e in rest)

    # the same worker still runs a normal task
    ok = app.tasks["basic.ok"].delay(1)
    wait_for(lambda: [e["id"] for e in events(app, "succeeded")] == [ok.id], 20)
    assert worker.alive

    # replaying the unknown task is refused, and the entry stays
    (done,) = store.replay([unknown.id])
    assert not done.sent and done.refused and "basic.not_registered" in done.refused
    assert store.get(unknown.id).reason == "unknown_task"
    refused = cli(ns, "replay", unknown.id)
    assert refused.returncode == 1
    assert "'basic.not_registered' is not registered" in refused.stderr
    assert store.get(unknown.id).reason == "unknown_task"


@pytest.mark.parametrize("fetch", ["true", "false"], ids=["reliable-fetch", "kombu-brpop"])
def test_header_values_arrive_as_kombu_decodes_them(ns, start_worker, fetch):
    """kombu encodes a datetime header as a typed JSON object and its consumer decodes it
    back; the Redis consumer that replaces kombu's read must decode entries the same way."""
    app = ns.app(basic.build)
    start_worker("basic", concurrency=1, env={"CELERY_RELIABLE_FETCH": fetch})
    app.send_task("basic.header_type", headers={"x-when": datetime.now(timezone.utc)})
    (seen,) = wait_for(lambda: events(app, "header_type"), 30)
    assert seen["type"] == "datetime"


def raw_entries(ns: Any) -> list[bytes]:
    """Entries pushed straight on a Redis queue list that kombu cannot build a message
    from. The last is a JSON envelope with a delivery tag (the fetch script records it)
    whose base64 body does not decode."""
    envelope = {
        "body": "!! not base64",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "delivery_tag": f"bad-body-{uuid.uuid4()}",
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": ns.queue},
            "priority": 0,
        },
    }
    return [b"not json", b"\xff\xfe", b"[1, 2]", b'{"body": 1}', json.dumps(envelope).encode()]


def leftovers(broker: redis.Redis, ns: Any, tags: set[str]) -> set[str]:
    """Which of ``tags`` are still in kombu's unacked hash, its index or a fetch record."""
    found = {t for t in tags if broker.hexists(f"{ns.broker_keyprefix}unacked", t)}
    found |= {t for t in tags if broker.zscore(f"{ns.broker_keyprefix}unacked_index", t)}
    for key in broker.keys(f"{ns.broker_keyprefix}{ns.prefix}:fetch:*"):
        found |= {t for t in tags if broker.hexists(key, t)}
    return found


@pytest.mark.parametrize("fetch", ["true", "false"], ids=["reliable-fetch", "kombu-brpop"])
def test_queue_entries_kombu_cannot_read_are_dead_lettered_not_fatal(ns, start_worker, fetch):
    """Before: an entry on the queue list that is not a kombu message (not JSON, not an
    envelope, a body that does not decode) killed the worker with "Unrecoverable error",
    under reliable fetch as under kombu's BRPOP (``reliable_fetch = False``)."""
    app = ns.app(basic.build)
    worker = start_worker("basic", concurrency=1, env={"CELERY_RELIABLE_FETCH": fetch})
    broker = redis.Redis.from_url(ns.broker_url)
    entries = raw_entries(ns)
    tag = json.loads(entries[-1])["properties"]["delivery_tag"]
    for item in entries:
        broker.lpush(ns.broker_keyprefix + ns.queue, item)
    ok = app.tasks["basic.ok"].delay(3)
    store = DeadLetterStore(app)
    wait_for(
        lambda: store.count() == len(entries) and ok.id in [e["id"] for e in events(app)],
        30,
        message=lambda: f"{store.count()} dead letters:\n{worker.log()[-4000:]}",
    )
    dead = store.list(limit=None)
    assert sorted(e.body or "" for e in dead) == sorted(
        item.decode("utf-8", "replace") for item in entries
    )
    assert {e.reason for e in dead} == {"malformed"} and all(e.id.startswith("msg-") for e in dead)
    assert all(e.queue == ns.queue and e.hostname == worker.nodename for e in dead)
    assert leftovers(broker, ns, {tag}) == set()  # forgotten as an ack would
    assert broker.llen(ns.broker_keyprefix + ns.queue) == 0
    assert worker.alive and "Unrecoverable error" not in worker.log()


def envelope(ns: Any, **change: Any) -> bytes:
    """A kombu Redis envelope of a good ``basic.ok`` task, with ``change`` applied: a key
    ``p_<name>`` sets that property, any other key sets that envelope field."""
    task_id = str(uuid.uuid4())
    body = base64.b64encode(json.dumps([[1], {}, {}]).encode()).decode()
    raw: dict[str, Any] = {
        "body": body,
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": v2_headers("basic.ok", task_id),
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": ns.queue},
            "priority": 0,
            "correlation_id": task_id,
        },
    }
    for name, value in change.items():
        if name.startswith("p_"):
            raw["properties"][name[2:]] = value
        else:
            raw[name] = value
    return json.dumps(raw).encode()


def test_envelopes_with_odd_fields_each_run_or_are_dead_lettered_once(ns, start_worker):
    """Envelope fields of the wrong type or value, pushed straight on the queue list: each
    message runs or is dead-lettered, exactly once, and the worker keeps serving."""
    app = ns.app(basic.build)
    worker = start_worker("basic", concurrency=1)
    broker = redis.Redis.from_url(ns.broker_url)
    odd: list[dict[str, Any]] = [
        {"p_delivery_info": 5},
        {"p_delivery_info": None},
        {"p_delivery_info": {"exchange": 5, "routing_key": None}},
        {"headers": 5},
        {"headers": None},
        {"content-encoding": "bogus"},
        {"content-type": "application/x-python-serialize"},
        {"content-type": None},
        {"p_body_encoding": "zlib"},
        {"p_body_encoding": 5},
        {"body": 5},
        {"body": None},
        {"p_priority": "high"},
        {"p_priority": None},
        {"p_delivery_tag": 5},
        {"properties": None},
    ]
    for change in odd:
        broker.lpush(ns.broker_keyprefix + ns.queue, envelope(ns, **change))
    store = DeadLetterStore(app)

    def ended() -> int:
        return store.count() + len(events(app, "succeeded"))

    wait_for(lambda: ended() == len(odd), 30, message=lambda: worker.log()[-4000:])
    ok = app.tasks["basic.ok"].delay(2)
    wait_for(lambda: ok.id in [e["id"] for e in events(app, "succeeded")], 30)
    assert ended() == len(odd) + 1  # nothing ran or was dead-lettered twice
    assert broker.llen(ns.broker_keyprefix + ns.queue) == 0
    wait_for(lambda: broker.hlen(f"{ns.broker_keyprefix}unacked") == 0, 10)  # all acked
    assert worker.alive and "Unrecoverable error" not in worker.log()


def test_json_body_that_is_not_a_task_body_is_dead_lettered(ns, start_worker):
    """Valid JSON that is not ``[args, kwargs, embed]`` passes the consumer and fails to
    unpack in the pool process, outside the task: it is still dead-lettered, not dropped."""
    app = ns.app(basic.build)
    worker = start_worker("basic")
    store = DeadLetterStore(app)
    task_id = str(uuid.uuid4())
    publish_raw(ns, json.dumps({"x": 1}).encode(), v2_headers("basic.ok", task_id))
    wait_for(lambda: store.count() == 1, 30, message=lambda: f"a dead letter:\n{worker.log()}")
    entry = store.get(task_id)
    assert entry.reason == "malformed" and entry.task == "basic.ok"
    ok = app.tasks["basic.ok"].delay(2)
    wait_for(lambda: [e["id"] for e in events(app, "succeeded")] == [ok.id], 20)


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def rabbit_ns(ns: Any) -> Iterator[Any]:
    """The test namespace with the shared RabbitMQ as broker (its own queue, deleted after)."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    amqp = dataclasses.replace(ns, broker_url=AMQP_URL)
    yield amqp
    with Connection(AMQP_URL) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(amqp.queue)


@pytest.mark.amqp
def test_bad_input_and_failures_are_dead_lettered_on_rabbitmq(rabbit_ns, start_worker):
    ns = rabbit_ns
    app = ns.app(basic.build)
    # a name of its own: the pidbox queue is broker-wide on the shared RabbitMQ
    worker = start_worker("basic", name=f"h{uuid.uuid4().hex[:8]}", env={"CR_BROKER_URL": AMQP_URL})
    store = DeadLetterStore(app)
    bad_id = str(uuid.uuid4())
    with Connection(AMQP_URL) as conn:
        conn.Producer().publish(
            b"{not json",
            exchange="",
            routing_key=ns.queue,
            headers=v2_headers("basic.ok", bad_id),
            content_type="application/json",
            content_encoding="utf-8",
        )
    unknown = app.send_task("basic.not_registered", args=[1])
    failed = app.tasks["basic.permanent"].delay(4)
    wait_for(lambda: store.count() == 3, 30, message=lambda: f"3 dead letters:\n{worker.log()}")
    assert store.get(bad_id).reason == "malformed"
    assert store.get(unknown.id).reason == "unknown_task"
    assert store.get(failed.id).reason == "dead_letter_for"
    ok = app.tasks["basic.ok"].delay(1)
    wait_for(lambda: [e["id"] for e in events(app, "succeeded")] == [ok.id], 20)
    assert worker.alive
