"""Pure unit properties of dead letters: JSON round trip, and that any message a producer
can put on a queue (any header values, any body) becomes a storable dead letter."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import Message

from celery_reliable import DeadLetter
from celery_reliable.deadletters.badinput import entry_for_message
from celery_reliable.deadletters.record import CUT_MARK, MAX_FIELD_CHARS, bounded

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    args=st.lists(json_values, max_size=5),
    kwargs=st.dictionaries(st.text(), json_values, max_size=5),
    headers=st.dictionaries(st.text(min_size=1).map(lambda k: "x-" + k), json_values),
)
def test_json_round_trip(args: list[Any], kwargs: dict[str, Any], headers: dict[str, Any]):
    entry = DeadLetter(id="i", task_id="i", task="t", args=args, kwargs=kwargs, headers=headers)
    assert DeadLetter.from_json(entry.to_json()) == entry


@settings(max_examples=150, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["id", "task", "retries", "x-tenant", "eta", "other"]), json_values
    ),
    body=st.binary(max_size=200),
    reason=st.sampled_from(["malformed", "unknown_task"]),
)
def test_any_message_becomes_a_storable_dead_letter(
    headers: dict[str, Any], body: bytes, reason: str
):
    message = Message(
        body=body,
        headers=headers,
        delivery_info={"routing_key": "q", "exchange": ""},
        content_type="application/json",
        content_encoding="utf-8",
    )
    entry = bounded(entry_for_message(message, reason, ValueError("bad"), "w1@host"), 1000)
    # what the store script receives must be strings, and the entry must serialize
    assert isinstance(entry.id, str) and entry.id
    assert entry.task is None or isinstance(entry.task, str)
    assert entry.task_id is None or isinstance(entry.task_id, str)
    assert isinstance(entry.retries, int)
    assert json.loads(entry.to_json())["reason"] == reason
    assert entry.queue == "q"
    if entry.body is not None:
        assert len(entry.body) <= MAX_FIELD_CHARS + len(CUT_MARK)


def test_messages_without_an_id_are_told_apart_by_their_delivery_tag():
    """Two equal headerless messages are two dead letters; the same message delivered
    again (kombu's Redis transport keeps its string tag) is still one."""

    def entry(body: bytes, tag: Any = None) -> DeadLetter:
        message = Message(body=body, headers={}, content_type="application/json", delivery_tag=tag)
        return entry_for_message(message, "malformed", None, "w1@host")

    assert entry(b"same").id != entry(b"same").id
    assert entry(b"same", "tag-1").id == entry(b"same", "tag-1").id != entry(b"same", "tag-2").id
    assert entry(b"same", 7).id != entry(b"same", 7).id  # AMQP tags are per channel
    assert entry(b"same").id.startswith("msg-")


def test_the_builder_stores_every_field_with_its_type():
    """A request's ``retries`` of ``"abc"`` used to raise while the dead letter was being
    built, so the failure was lost; the builder stores 0 (and text for odd ids)."""
    from celery_reliable.deadletters.record import build

    entry = build(task_id=5, task=["t"], reason="max_retries", retries="abc", args=None)
    assert (entry.id, entry.task_id, entry.task, entry.retries) == ("5", "5", "['t']", 0)
    assert entry.args == [] and entry.body == "[None, None]"
    assert build(task_id="i", task="t", reason="max_retries", retries=float("nan")).retries == 0
