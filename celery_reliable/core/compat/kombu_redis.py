"""The private parts of kombu's Redis transport that reliable fetch touches.

Reliable fetch (:mod:`celery_reliable.orphans.fetch`) replaces how one kombu Redis channel
pops messages, and extends how its QoS records and forgets them. kombu has no public hook
for either, so the attributes below are used as kombu 5.6/5.7 define them; nothing else in
the package reaches into the transport for fetching. :data:`TOUCHPOINTS` lists them; the
compatibility check of :mod:`celery_reliable.core.compat` includes them, so ``install()``
fails naming any that a kombu release lacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as kombu_loads

#: ``(owner, attribute, how it is used)`` for every private kombu attribute used here.
TOUCHPOINTS: tuple[tuple[type, str, str], ...] = (
    (kombu_redis.Channel, "_brpop_start", "replaced on the channel instance (send the pop)"),
    (kombu_redis.Channel, "_brpop_read", "replaced on the instance (close() reads with it)"),
    (kombu_redis.Channel, "handlers", "its 'BRPOP' entry replaced (read the reply)"),
    (kombu_redis.Channel, "_in_poll", "set while a reply is pending, as kombu does"),
    (kombu_redis.Channel, "_brpop_sent_at", "set when sent (kombu's BRPOP health check)"),
    (kombu_redis.Channel, "_queue_cycle", "consume()/rotate(): kombu's fair queue rotation"),
    (kombu_redis.Channel, "_q_for_pri", "queue key of a priority step (with sep)"),
    (kombu_redis.Channel, "priority_steps", "the priority steps polled"),
    (kombu_redis.Channel, "global_keyprefix", "prefix of every broker key"),
    (kombu_redis.Channel, "active_queues", "the queues consumed"),
    (kombu_redis.Channel, "ack_emulation", "False: no unacked hash, fetch stays off"),
    (kombu_redis.Channel, "unacked_key", "kombu's unacked hash"),
    (kombu_redis.Channel, "unacked_index_key", "kombu's unacked_index sorted set"),
    (kombu_redis.Channel, "_flush_brpop_reauth", "called after each reply, as kombu does"),
    (kombu_redis.QoS, "append", "wrapped: skip the write the fetch script already did"),
    (kombu_redis.QoS, "_remove_from_indices", "wrapped: also forget the fetch record"),
    (VirtualQoS, "_delivered", "the tags this channel delivered and has not acked"),
    (kombu_redis.Channel, "_do_restore_message", "push a recorded message back on its queue"),
    (VirtualQoS, "append", "local bookkeeping of a delivered message"),
    (kombu_redis.Transport, "_deliver", "hand a popped message to its consumer"),
)

#: Attributes kombu added in 5.7 (the BRPOP health check): set or called only when present.
SINCE_KOMBU_5_7 = frozenset({"_brpop_sent_at", "_flush_brpop_reauth"})


def is_redis_channel(channel: Any) -> bool:
    """True for a channel of kombu's Redis (or Sentinel) transport."""
    return isinstance(channel, kombu_redis.Channel)


def key_prefix(channel: Any) -> str:
    """kombu's ``global_keyprefix`` of ``channel`` ('' when unset)."""
    return str(channel.global_keyprefix or "")


def unacked_keys(channel: Any) -> tuple[str, str]:
    """kombu's ``unacked`` and ``unacked_index`` key names (without the global prefix)."""
    return str(channel.unacked_key), str(channel.unacked_index_key)


def next_queues(channel: Any) -> list[str]:
    """The consumed queues in kombu's fair order for the next pop ([] when none)."""
    return list(channel._queue_cycle.consume(len(channel.active_queues)) or [])


def queue_keys(channel: Any, queues: list[str]) -> list[tuple[str, str]]:
    """``(key, queue)`` pairs in BRPOP order: each priority step, each queue."""
    return [
        (str(channel._q_for_pri(queue, pri)), queue)
        for pri in channel.priority_steps
        for queue in queues
    ]


def rotate(channel: Any, queue: str) -> None:
    """Move ``queue`` to the end of the fair rotation (it just gave a message)."""
    channel._queue_cycle.rotate(queue)


def send(channel: Any, *command: Any) -> None:
    """Send ``command`` on the channel's polling connection; its reply is read later."""
    connection = channel.client.connection
    channel._in_poll = connection
    channel._brpop_sent_at = time.monotonic()
    connection.send_command(*command)


def read_reply(channel: Any, command: str, **options: Any) -> Any:
    """Read the pending reply on the polling connection (disconnecting on a connection
    error, so the next poll reconnects, as kombu does)."""
    client = channel.client
    try:
        return client.parse_response(client.connection, command, **options)
    except channel.connection_errors:
        client.connection.disconnect()
        raise


def reply_pending(channel: Any) -> bool:
    """Whether a command was sent on the polling connection and its reply not yet read
    (kombu pauses reading while the prefetch limit is reached)."""
    return bool(channel._in_poll)


def done_reading(channel: Any) -> None:
    """No reply pending any more (kombu's bookkeeping after each BRPOP reply)."""
    channel._in_poll = None
    flush = getattr(channel, "_flush_brpop_reauth", None)
    if flush is not None:
        flush()


def decode_entry(item: Any) -> Any:
    """A popped queue entry decoded as kombu's consumer decodes it (kombu's JSON, which
    turns typed values such as a datetime header back into their types).

    Raises:
        ValueError: not JSON (or a typed value that does not decode).
    """
    return kombu_loads(bytes_to_str(item))


def deliver(channel: Any, payload: dict[str, Any], queue: str) -> None:
    """Hand a popped message to the consumer of ``queue`` (which appends it to the QoS)."""
    channel.connection._deliver(payload, queue)


def forget(channel: Any, tag: str) -> None:
    """Remove delivered message ``tag`` from ``unacked`` and its index (and whatever the
    QoS wrappers add) in one MULTI, as kombu's ack does, without acknowledging it."""
    channel.qos._remove_from_indices(tag).execute()


def kombu_pop(channel: Any) -> Callable[..., Any]:
    """kombu's own BRPOP sender of ``channel`` (``_brpop_start``), even after
    :func:`install_poll` replaced it on the instance."""
    return type(channel)._brpop_start.__get__(channel)  # type: ignore[no-any-return]


def install_poll(channel: Any, start: Callable[..., Any], read: Callable[..., Any]) -> None:
    """Make the channel send its polls with ``start`` and read their replies with ``read``
    (the poller calls ``handlers['BRPOP']``; ``Channel.close`` calls ``_brpop_read`` for a
    reply still pending)."""
    channel._brpop_start = start
    channel._brpop_read = read
    channel.handlers["BRPOP"] = read


def wrap_qos(
    qos: Any,
    append: Callable[[Callable[..., Any], Any, Any], Any],
    remove: Callable[[Callable[..., Any], Any, Any], Any],
) -> None:
    """Wrap the QoS instance's ``append`` and ``_remove_from_indices``: each wrapper gets
    the original as its first argument."""
    original_append, original_remove = qos.append, qos._remove_from_indices

    def new_append(message: Any, delivery_tag: Any) -> Any:
        return append(original_append, message, delivery_tag)

    def new_remove(delivery_tag: Any, pipe: Any = None) -> Any:
        return remove(original_remove, delivery_tag, pipe)

    qos.append, qos._remove_from_indices = new_append, new_remove


def append_locally(qos: Any, message: Any, delivery_tag: Any) -> None:
    """kombu's local bookkeeping of a delivered message, without writing to Redis."""
    VirtualQoS.append(qos, message, delivery_tag)


def delivered_tags(qos: Any) -> set[str]:
    """Delivery tags the channel delivered and has not acknowledged (event loop thread)."""
    return {str(tag) for tag in list(qos._delivered or ())}


def give_back(channel: Any, tag: str, delivered_at: str, record: str) -> str:
    """Put message ``tag`` back on its queue if its ``unacked_index`` score is still
    ``delivered_at`` (``restored``); otherwise only forget it in ``record`` (``stale``).
    One WATCH/MULTI transaction, as kombu's own ``restore_by_tag``."""
    qos = channel.qos
    unacked, index = unacked_keys(channel)
    outcome = ["stale"]

    def transaction(pipe: Any) -> None:
        raw = pipe.hget(unacked, tag)
        score = pipe.zscore(key_prefix(channel) + index, tag)  # ZSCORE: kombu does not prefix
        pipe.multi()
        if raw and score is not None and float(score) == float(delivered_at):
            qos._remove_from_indices(tag, pipe)  # with reliable fetch: the record entry too
            payload, exchange, routing_key = json.loads(bytes_to_str(raw))
            channel._do_restore_message(payload, exchange, routing_key, pipe, False)
            outcome[0] = "restored"
        else:
            pipe.hdel(record, tag)

    with channel.conn_or_acquire() as client:
        client.transaction(transaction, unacked)
    return outcome[0]
