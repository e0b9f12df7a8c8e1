"""Guarantee 7 (bad input), hostile forms: messages whose headers or body have the wrong
shape, published raw with kombu to a real prefork worker on Redis and on RabbitMQ. Each is
dead-lettered (``malformed``) or runs; none kills the worker's main process; none vanishes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pytest
from celery.utils.time import maybe_iso8601, maybe_make_aware
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from kombu import Connection

from celery_reliable import DeadLetterStore
from celery_reliable.testing import wait_for
from tests.apps import basic, hostile
from tests.apps.common import events
from tests.test_badinput import AMQP_URL, publish_raw, rabbit_ns, v2_headers  # noqa: F401

#: Bodies of the wrong shape (a task body is [args, kwargs, embed]).
BAD_BODIES = {
    "args not a list": ["a", "b", {}],
    "embed not an object": [[], {}, 5],
    "kwargs not an object": [[], [1], {}],
    "embed overriding the request": [[1], {}, {"is_eager": True}],
    "two parts": [[1], {}],
}
#: Headers of the wrong type or value, each on a message for basic.ok(1).
BAD_HEADERS = {
    "timelimit of strings": {"timelimit": ["a", "b"]},
    "timelimit a string": {"timelimit": "ab"},
    "timelimit of one": {"timelimit": [1]},
    "expires true": {"expires": True},
    "eta out of range": {"eta": "0001-01-01T00:00:00+14:00"},
    "retries a string": {"retries": "abc"},
    "stamps a list": {"stamps": [1], "stamped_headers": ["a"]},
}
#: Only kombu's Redis transport carries these (headers are JSON there): RabbitMQ drops a
#: message whose header table holds an infinite float before any consumer sees it.
REDIS_ONLY_HEADERS = {"timelimit infinite": {"timelimit": [float("inf"), None]}}


@pytest.fixture(params=["redis", pytest.param("amqp", marks=pytest.mark.amqp)])
def broker(request: Any, ns: Any) -> tuple[Any, dict[str, Any]]:
    """The namespace and ``start_worker`` arguments of the parametrized broker. On the
    shared RabbitMQ the worker gets a name of its own (its pidbox queue is broker-wide)."""
    if request.param == "redis":
        return ns, {}
    amqp = request.getfixturevalue("rabbit_ns")
    return amqp, {"env": {"CR_BROKER_URL": AMQP_URL}, "name": f"h{uuid.uuid4().hex[:8]}"}


def publish(ns: Any, body: bytes, headers: dict[str, Any] | None) -> None:
    """Put one message on the test's queue through kombu, bypassing Celery."""
    if ns.broker_url.startswith("redis"):
        publish_raw(ns, body, headers)
        return
    with Connection(ns.broker_url) as conn:
        conn.Producer().publish(
            body,
            exchange="",
            routing_key=ns.queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
        )


def test_poison_messages_are_dead_lettered_and_the_worker_keeps_serving(broker, start_worker):
    """Before: a timelimit of strings made the worker exit ("Unrecoverable error") and the
    message killed the next worker too; bad bodies and numeric ids were acked with only a
    log line; two equal headerless messages made one dead letter."""
    ns, worker_options = broker
    app = ns.app(basic.build)
    worker = start_worker("basic", **worker_options)
    store = DeadLetterStore(app)
    expected: dict[str, str] = {}  # dead-letter id -> case
    bad_headers = {**BAD_HEADERS, **(REDIS_ONLY_HEADERS if not worker_options else {})}
    for case, headers in bad_headers.items():
        task_id = str(uuid.uuid4())
        task = "basic.permanent" if "retries" in headers else "basic.ok"
        publish(ns, json.dumps([[1], {}, {}]).encode(), {**v2_headers(task, task_id), **headers})
        expected[task_id] = case
    for case, body in BAD_BODIES.items():
        task_id = str(uuid.uuid4())
        publish(ns, json.dumps(body).encode(), v2_headers("basic.ok", task_id))
        expected[task_id] = case
    for odd_id in (5, None, [], []):  # ids that are no string: entry ids of their own
        publish(
            ns, json.dumps([[1], {}, {}]).encode(), {**v2_headers("basic.ok", "x"), "id": odd_id}
        )
    for _ in range(2):  # twins: no headers, the same body
        publish(ns, b'{"same": "body"}', {})
    ok = app.tasks["basic.ok"].delay(2)

    total = len(expected) + 6
    wait_for(
        lambda: store.count() == total,
        60,
        message=lambda: f"{total} dead letters, got {store.count()}:\n{worker.log()[-4000:]}",
    )
    entries = {e.id: e for e in store.list(limit=None)}
    for entry_id, case in expected.items():
        entry = entries.pop(entry_id, None)
        assert entry is not None, f"{case}: no dead letter"
        assert entry.reason == "malformed", (case, entry)
        assert entry.body is not None and entry.queue == ns.queue, case
    assert len(entries) == 6 and all(e.id.startswith("msg-") for e in entries.values())
    assert sorted(str(e.task_id) for e in entries.values()) == [
        "5",
        "None",
        "None",
        "None",
        "[]",
        "[]",
    ]
    assert sorted(e.body for e in entries.values()).count('{"same": "body"}') == 2
    wait_for(lambda: ok.id in [e["id"] for e in events(app, "succeeded")], 30)
    assert [e["x"] for e in events(app, "succeeded")] == [2]  # no bad message ran
    assert worker.alive, worker.log()[-4000:]
    assert "Unrecoverable error" not in worker.log()


# --------------------------------------------------------------------------- fuzzing

#: Examples per broker in CI (seeded, so every run tries the same messages); set
#: HOSTILE_FUZZ_EXAMPLES for the long form (e.g. 2000).
FUZZ_EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "25"))
#: The protocol-2 headers Celery reads or sends.
PROTOCOL_HEADERS = (
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "stamped_headers",
    "stamps",
    "replaced_task_nesting",
)

# JSON values both brokers can carry in headers (AMQP field tables: 64-bit integers,
# finite floats, text without lone surrogates).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=("Cs",)), max_size=6), inner, max_size=3
        )
    ),
    max_leaves=6,
)


@st.composite
def messages(draw: Any) -> tuple[dict[str, Any], Any]:
    """A protocol-2 message for hostile.sink with some headers and maybe the body replaced
    by arbitrary JSON values."""
    headers = v2_headers("hostile.sink", str(uuid.uuid4()))
    del headers["x-tenant"]
    # a few headers at a time, so that some messages are good enough to run
    altered = draw(st.lists(st.sampled_from(PROTOCOL_HEADERS), max_size=4, unique=True))
    for name in altered:
        if draw(st.booleans()):
            headers[name] = draw(json_values)
        else:
            headers.pop(name, None)
    good_body = st.tuples(
        st.lists(json_values, max_size=3),
        st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        st.none() | st.just({}) | st.just({"callbacks": None, "errbacks": None}),
    ).map(list)
    body = draw(good_body | good_body | json_values | st.lists(json_values, min_size=3, max_size=3))
    return headers, body


def schedules_later(headers: dict[str, Any]) -> bool:
    """Whether Celery would hold this message (a valid eta in the future) or discard it
    as expired (a valid expires in the past): neither runs nor is malformed, by design."""
    now = datetime.now(timezone.utc)
    for name, later in (("eta", True), ("expires", False)):
        value = headers.get(name)
        if not isinstance(value, str):
            continue
        try:
            when = maybe_make_aware(maybe_iso8601(value))
        except Exception:
            continue
        if when is not None and ((when > now) if later else (when < now)):
            return True
    return False


@pytest.mark.timeout(max(600, FUZZ_EXAMPLES * 3))
def test_fuzzed_messages_run_or_are_dead_lettered_once(broker, start_worker):
    """Any JSON value in any protocol-2 header and any body shape, each message followed
    by a good task: the main process never exits, every good task runs, and every bad
    message either runs or is dead-lettered, exactly once."""
    ns, worker_options = broker
    app = ns.app(hostile.build)
    worker = start_worker("hostile", **worker_options)
    store = DeadLetterStore(app)
    options = {"global_keyprefix": ns.broker_keyprefix} if not worker_options else {}
    conn = Connection(ns.broker_url, transport_options=options)
    producer = conn.Producer()
    sent: list[str] = []

    def outcomes(mark: str) -> list[str]:
        ran = [e for e in events(app, "ran") if e["mark"] == mark]
        dead = [e for e in store.list(limit=None) if e.headers.get(hostile.MARK) == mark]
        return ["ran"] * len(ran) + [f"dead:{e.reason}" for e in dead]

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate),
    )
    @given(message=messages())
    def check(message: tuple[dict[str, Any], Any]) -> None:
        headers, body = message
        assume(not schedules_later(headers))
        mark = f"m{len(sent)}"
        sent.append(mark)
        if isinstance(headers.get("id"), str):
            # Dead letters are idempotent by task id (a redelivered message is one entry),
            # so two bad messages sharing an id would be one entry by design: keep ids apart.
            headers["id"] += f"~{mark}"
        producer.publish(
            json.dumps(body).encode(),
            exchange="",
            routing_key=ns.queue,
            headers={**headers, hostile.MARK: mark},
            content_type="application/json",
            content_encoding="utf-8",
        )
        good = app.tasks["hostile.good"].delay(len(sent))

        def settled() -> bool:
            assert worker.alive, f"{mark} ({headers}, {body!r}):\n{worker.log()[-4000:]}"
            return good.id in [e["id"] for e in events(app, "succeeded")] and bool(outcomes(mark))

        wait_for(
            settled,
            30,
            message=lambda: (
                f"the good task and {mark} ({headers}, {body!r}):\n" + worker.log()[-3000:]
            ),
        )
        assert worker.alive, worker.log()[-4000:]

    # No shrinking: a failing example has killed the worker (or wedged it), so every
    # later example would fail for that reason; the example itself is in the message.
    try:
        check()
    finally:
        conn.release()
    assert worker.alive and "Unrecoverable error" not in worker.log()
    counted = {mark: outcomes(mark) for mark in sent}
    assert {m: o for m, o in counted.items() if len(o) != 1} == {}
    assert all(o[0] in ("ran", "dead:malformed", "dead:unknown_task") for o in counted.values())
    print(f"fuzz: {len(sent)} messages:", Counter(o[0] for o in counted.values()))


# --------------------------------------------------------------------------- own headers

#: Values of the wrong type or range for the package's own headers.
ODD_VALUES: list[Any] = [5, "abc", -1, 1e300, None, [1], {"a": 1}, True, "", float("nan")]
OWN_HEADERS = ("x-reliable-slot", "x-reliable-copy", "x-reliable-published", "x-reliable-order")


def test_own_headers_of_any_value_never_lose_a_task(ns, start_worker):
    """Before: an ``x-reliable-slot`` that was no number (``"abc"``, a list, NaN) failed the
    rate-limited task at start; it was acknowledged as a plain failure, neither run nor
    dead-lettered. And a rate-limit key function that raises (an order without a tenant)
    lost its task the same way; it is now dead-lettered as ``malformed``."""
    from tests.apps import obs

    app = ns.app(obs.build)
    worker = start_worker("obs", concurrency=2)
    sent: list[str] = []
    for value in ODD_VALUES:
        for header in OWN_HEADERS:
            for name, args in (("obs.limited", (1,)), ("obs.ordered", ("k", 1)), ("obs.ok", (1,))):
                sent.append(app.send_task(name, args=args, headers={header: value}).id)
    keyless = app.tasks["obs.per_tenant"].delay({"id": 7})  # no tenant: the key raises
    keyed = app.tasks["obs.per_tenant"].delay({"id": 8, "tenant": "acme"})
    store = DeadLetterStore(app)

    def ended() -> Counter[str]:
        ran = Counter(e["id"] for e in events(app))
        ran.update(e.task_id for e in store.list(limit=None))
        return ran

    everyone = [*sent, keyless.id, keyed.id]
    wait_for(
        lambda: set(everyone) <= set(ended()),
        60,
        interval=0.2,
        message=lambda: f"{len(set(everyone) - set(ended()))} tasks never ended",
    )
    assert max(ended().values()) == 1  # and none ended twice
    (dead,) = store.list(limit=None)
    assert (dead.task_id, dead.reason) == (keyless.id, "malformed")
    assert dead.exception and "KeyError" in dead.exception
    assert worker.alive and "Unrecoverable error" not in worker.log()
