"""Reliable fetch: a message popped from a Redis queue is recorded in the same step.

kombu's Redis transport consumes with BRPOP and writes the message to its ``unacked``
hash only later, when the worker's event loop reads the reply and the consumer callback
runs. A ``kill -9`` in between (the reply still in the socket) loses the message: no copy
is left in Redis. With reliable fetch (on by default after ``install(app)``; turn it off
with ``reliable_fetch = False``) the task channel of a worker pops with one Lua script
(``fetch.lua``) that takes the message from the first non-empty queue key, in kombu's
order, and in the same step writes kombu's own ``unacked`` entry and index (so
acknowledgement, requeue, shutdown restore and the visibility timeout work unchanged) and
an entry in the worker's *fetch record*::

    <global_keyprefix><reliable_key_prefix>:fetch:<worker id>   HASH  delivery tag -> JSON
        {"t": delivery time (Redis clock, = its unacked_index score), "id": task id,
         "task": task name, "q": queue, "r": 1 when kombu restored it before}

So a message is, at every instant, on its queue, in ``unacked`` *and* the record of the
worker holding it, or acknowledged (the ack removes the three entries in one MULTI). When
the worker dies the reaper gives back every message of its record
(:mod:`celery_reliable.orphans.reaper`). The record is also the in-flight record of the
worker's ReliableTasks: while the channel fetches this way, the pool processes write no
ledger entry for a message delivered for the first time (see
:mod:`celery_reliable.orphans.ledger`).

When every queue is empty the channel waits with ``BLMOVE key key RIGHT RIGHT`` on the
first queue of the rotation (a no-op move: the element stays; Redis >= 6.2), so a message
on that queue wakes it at once; messages on other queues or priority steps are seen at the
next poll, at most :data:`IDLE_WAIT_MAX` seconds later.

Every ``reliable_worker_timeout`` the worker also gives back the entries of its own record
that its channel never delivered (:meth:`ReliableFetch.reconcile`): a pop whose reply was
lost with its connection.

Only the task consumer's channel of a worker changes: plain Celery tasks on those queues
get the same protection; fanout and pidbox (broadcast) channels, publishing and other
channels are kombu's own. Every private kombu attribute used is in
:mod:`celery_reliable.core.compat.kombu_redis`.

Examples:
    >>> celery_reliable.install(app)               # reliable fetch on
    >>> app.conf.reliable_fetch = False            # kombu's BRPOP
"""

from __future__ import annotations

import json
import logging
import time
from queue import Empty
from typing import Any

from celery import bootsteps
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

from ..core.compat import kombu_redis as kr
from ..core.state import settings_of
from ..deadletters.store import WRITE_PATIENCE
from .registry import current_worker_id, held_delivery_tags, record_key, set_fetching
from .scripts import FETCH
from .undeliverable import GuardedBrpop, Undeliverable

logger = logging.getLogger(__name__)

#: Redis version the idle wait (BLMOVE) needs.
MIN_REDIS_VERSION = (6, 2)
#: Seconds the first idle wait lasts after a message was fetched; doubled while idle.
IDLE_WAIT_MIN = 0.05
#: Longest idle wait: a message on a queue other than the one waited on waits this long.
IDLE_WAIT_MAX = 0.5
#: Seconds before fetching again after a Redis error reply (OOM, WRONGTYPE...); doubled
#: while errors repeat, up to :data:`ERROR_BACKOFF_MAX`.
ERROR_BACKOFF_MIN = 0.1
ERROR_BACKOFF_MAX = 2.0
#: Seconds between two log lines about the same failing fetch.
ERROR_LOG_INTERVAL = 30.0


class ReliableFetch:
    """Reliable fetch on one kombu Redis channel (see the module docstring).

    Parameters:
      channel: the worker's task channel (``kombu.transport.redis.Channel``).
      record: the worker's fetch record key (:func:`record_key`).
      undeliverable: what to do with an entry kombu cannot build a message from (not
        JSON, not an envelope, a body that does not decode); None: raise, as kombu does.

    Examples:
        >>> ReliableFetch(consumer.channel, record_key("reliable", worker_id)).install()
    """

    def __init__(
        self, channel: Any, record: str, undeliverable: Undeliverable | None = None
    ) -> None:
        self.channel = channel
        self.record = record
        self.undeliverable = undeliverable
        self.prefix = kr.key_prefix(channel)
        self.source = FETCH.source()
        self.sha = ""
        self.command = "EVALSHA"
        self.queues: list[str] = []
        #: The queue keys of the last pop, in its order (without the global prefix).
        self.keys: list[str] = []
        #: Whether the message being delivered reached the QoS (so, the consumer).
        self.handed = False
        self.idle_wait = IDLE_WAIT_MIN
        self.retry_at = 0.0
        self.backoff = ERROR_BACKOFF_MIN
        self.logged_at = 0.0
        #: The delivery tag the fetch script recorded, while its message is delivered.
        self.recorded: str | None = None

    def install(self) -> None:
        """Load the script and take over the channel's pop and QoS bookkeeping."""
        with self.channel.conn_or_acquire() as client:
            self.sha = str(client.script_load(self.source))
        kr.install_poll(self.channel, self.start, self.read)
        kr.wrap_qos(self.channel.qos, self._append, self._remove)

    # --- the poll: send, then read the reply when the socket is readable ---

    def start(self, timeout: Any = None) -> None:
        """Send the next pop (or, after an empty one, the idle wait)."""
        if time.monotonic() < self.retry_at:
            return  # backing off after an error reply; the next loop tick tries again
        queues = kr.next_queues(self.channel)
        if not queues:
            return
        pairs = kr.queue_keys(self.channel, queues)
        p = self.prefix
        if self.command == "BLMOVE":
            key = p + pairs[0][0]
            kr.send(self.channel, "BLMOVE", key, key, "RIGHT", "RIGHT", self.idle_wait)
            return
        unacked, index = kr.unacked_keys(self.channel)
        self.queues = [queue for _, queue in pairs]
        self.keys = [key for key, _ in pairs]
        kr.send(
            self.channel,
            "EVALSHA",
            self.sha,
            3 + len(pairs),
            p + unacked,
            p + index,
            p + self.record,
            *(p + key for key, _ in pairs),
            *self.queues,
        )

    def read(self, **options: Any) -> bool:
        """Read the reply; deliver the message it carries. Raises Empty when none."""

        try:
            try:
                reply = kr.read_reply(self.channel, self.command, **options)
            except self.channel.ResponseError as exc:
                self._failed(exc)
                raise Empty() from None
            self.backoff = ERROR_BACKOFF_MIN
            if self.command == "BLMOVE":  # the wait is over: pop next
                self.command = "EVALSHA"
                self.idle_wait = min(self.idle_wait * 2, IDLE_WAIT_MAX)
                raise Empty()
            if not reply:
                self.command = "BLMOVE"
                raise Empty()
            self.idle_wait = IDLE_WAIT_MIN
            position, item, recorded = reply
            queue = self.queues[int(position) - 1]
            kr.rotate(self.channel, queue)
            tag: str | None = None
            self.handed = False
            try:
                payload = kr.decode_entry(item)
                if int(recorded):
                    tag = self.recorded = str(payload["properties"]["delivery_tag"])
                kr.deliver(self.channel, payload, queue)
            except Exception as exc:
                if self.handed or self.undeliverable is None:
                    raise  # the consumer had the message: its own error, as before
                key = self.keys[int(position) - 1]
                if not self.undeliverable(self.channel, item, key, queue, tag, exc):
                    # the store failed: the entry is back; pause as a failing write does
                    self.retry_at = time.monotonic() + WRITE_PATIENCE
            finally:
                self.recorded = None
            return True
        finally:
            kr.done_reading(self.channel)

    def _failed(self, exc: Exception) -> None:
        self.command = "EVALSHA"
        if isinstance(exc, NoScriptError):  # the broker restarted or flushed its scripts
            with self.channel.conn_or_acquire() as client:
                self.sha = str(client.script_load(self.source))
            return
        now = time.monotonic()
        self.retry_at = now + self.backoff
        if now - self.logged_at >= ERROR_LOG_INTERVAL:
            self.logged_at = now
            logger.error(
                "celery_reliable: reliable fetch failed (%r); nothing was taken from the "
                "queues. Retrying with backoff (up to %.1fs)",
                exc,
                ERROR_BACKOFF_MAX,
            )
        self.backoff = min(self.backoff * 2, ERROR_BACKOFF_MAX)

    # --- QoS: the script already recorded the message; the ack forgets the record ---

    def _append(self, original: Any, message: Any, delivery_tag: Any) -> Any:
        if self.recorded is not None and str(delivery_tag) == self.recorded:
            kr.append_locally(self.channel.qos, message, delivery_tag)
            result = None
        else:
            result = original(message, delivery_tag)
        self.handed = True
        return result

    def _remove(self, original: Any, delivery_tag: Any, pipe: Any) -> Any:
        return original(delivery_tag, pipe).hdel(self.record, delivery_tag)

    # --- a reply that never arrived ---

    def reconcile(self, min_age: float, held: set[str]) -> int:
        """Give back the entries of this worker's record that its channel never delivered
        (a fetch reply lost with its connection: the script ran, nobody read the reply)
        and that are older than ``min_age`` seconds. ``held`` are tags Celery still holds
        from an earlier channel (tasks running across a reconnect). Returns how many."""
        if self.command == "EVALSHA" and kr.reply_pending(self.channel):
            return 0  # a pop is outstanding: its message is in the record, not yet read
        with self.channel.conn_or_acquire() as client:
            raw = client.hgetall(self.prefix + self.record)  # kombu does not prefix HGETALL
            seconds, micros = client.time()
        now = seconds + micros / 1e6
        mine = kr.delivered_tags(self.channel.qos) | held
        given = 0
        for tag, value in raw.items():
            tag = bytes_to_str(tag)
            try:
                t = str(json.loads(bytes_to_str(value))["t"])
            except (ValueError, KeyError, TypeError):
                continue
            if tag in mine or tag == self.recorded or now - float(t) < min_age:
                continue
            if kr.give_back(self.channel, tag, t, self.record) == "restored":
                given += 1
                logger.warning(
                    "celery_reliable: gave back message %s: fetched %.1fs ago but never "
                    "delivered to this worker (its fetch reply was lost)",
                    tag,
                    now - float(t),
                )
        return given


def broker_version(channel: Any) -> tuple[int, ...]:
    with channel.conn_or_acquire() as client:
        raw = str(client.info("server").get("redis_version", "0"))
    return tuple(int(part) for part in raw.split(".")[:2] if part.isdigit())


class FetchStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: reliable fetch on the task channel (Redis broker, ``reliable_fetch``).

    Runs at every consumer (re)start, after the task consumer exists and before the event
    loop sends the first pop.
    """

    label = "reliable-fetch"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.timer_entry: Any = None

    def stop(self, c: Any) -> None:
        entry, self.timer_entry = self.timer_entry, None
        if entry is not None:
            entry.cancel()

    def start(self, c: Any) -> None:
        on = self._start(c)
        set_fetching(on)  # the pool processes skip the ledger while this is on
        if not on:
            self._guard_brpop(c)

    def _guard_brpop(self, c: Any) -> None:
        """kombu's BRPOP stays, with unreadable entries dead-lettered (Redis broker)."""
        consumer = getattr(c, "task_consumer", None)
        channel = getattr(consumer, "channel", None)
        if channel is None or not kr.is_redis_channel(channel):
            return
        if getattr(channel, "_reliable_fetch", None) or getattr(channel, "_reliable_brpop", None):
            return
        guard = GuardedBrpop(channel, Undeliverable(c.app, getattr(c, "hostname", None)))
        guard.install()
        channel._reliable_brpop = guard

    def _start(self, c: Any) -> bool:
        settings = settings_of(c.app)
        worker_id = current_worker_id()
        consumer = getattr(c, "task_consumer", None)
        if not settings.fetch or worker_id is None or consumer is None:
            return False
        channel = consumer.channel
        if not kr.is_redis_channel(channel):
            return False
        if getattr(channel, "_reliable_fetch", None):
            return True
        if not channel.ack_emulation:
            logger.warning(
                "celery_reliable: reliable_fetch is off: the broker's ack_emulation is False"
            )
            return False
        version = broker_version(channel)
        if version < MIN_REDIS_VERSION:
            logger.error(
                "celery_reliable: reliable_fetch needs Redis >= %s on the broker (found %s);"
                " consuming with kombu's BRPOP, where a kill -9 can lose a message being"
                " received. Set reliable_fetch = False to silence this.",
                ".".join(map(str, MIN_REDIS_VERSION)),
                ".".join(map(str, version)),
            )
            return False
        fetch = ReliableFetch(
            channel,
            record_key(settings.key_prefix, worker_id),
            Undeliverable(c.app, getattr(c, "hostname", None)),
        )
        fetch.install()
        channel._reliable_fetch = fetch
        logger.info("celery_reliable: reliable fetch on (record %s)", fetch.record)
        if c.timer is not None:
            every = settings.worker_timeout

            def reconcile() -> None:
                try:
                    fetch.reconcile(every, set(held_delivery_tags()))
                except Exception as exc:  # the broker is away: the next round retries
                    logger.debug("celery_reliable: fetch record check failed: %r", exc)

            self.timer_entry = c.timer.call_repeatedly(every, reconcile)
        return True
