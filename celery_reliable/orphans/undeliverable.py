"""What a worker does with a Redis queue entry that is not a message kombu can deliver.

A Redis queue is a list anyone can push to. kombu's own consumer decodes each popped entry
as its JSON envelope and builds a message from it in the worker's event loop, so an entry
that is not JSON, not an envelope, or whose body does not decode (``base64`` that is not)
raises there, and the worker dies with "Unrecoverable error". The bad-input guard
(:mod:`celery_reliable.deadletters.badinput`) cannot see it: it wraps Celery's handlers,
which only ever get messages kombu could build.

Reliable fetch (:mod:`celery_reliable.orphans.fetch`), and :class:`GuardedBrpop` where the
worker consumes with kombu's BRPOP (``reliable_fetch = False``, a broker older than Redis
6.2), hand such an entry to :class:`Undeliverable` instead. It is dead-lettered with reason
``malformed`` (the entry's text in ``body``, the exception in ``error``), then forgotten:
when the fetch script recorded it (a JSON envelope with a delivery tag), its ``unacked``
entry, index and fetch record go in one MULTI, as an ack would remove them.

An error raised once kombu built the message and handed it to the consumer (the QoS has
it) is the consumer's own and is raised as before; Celery's handlers are guarded by the
bad-input step.

When the dead letter cannot be written (the store is down), nothing is lost: a recorded
entry stays recorded and comes back to its queue through the worker's own record check
(every ``reliable_worker_timeout``), and one that was not recorded is pushed back on its
queue key at once; either way the failure is logged (at most once per
:data:`~celery_reliable.deadletters.store.WRITE_ERROR_LOG_INTERVAL`) and counted.

Examples:
    >>> undeliverable = Undeliverable(app, hostname="celery@host")
    >>> undeliverable(channel, b"not json", "celery", "celery", None, ValueError("..."))
    True
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from queue import Empty
from typing import Any

from kombu.utils.encoding import bytes_to_str

from ..core import instruments
from ..core.compat import kombu_redis as kr
from ..deadletters import record
from ..deadletters.store import (
    WRITE_ERROR_LOG_INTERVAL,
    WRITE_PATIENCE,
    DeadLetterStore,
    LogThrottle,
)

logger = logging.getLogger(__name__)

#: Failing dead-letter writes of undeliverable entries are logged at most this often.
_write_errors = LogThrottle(WRITE_ERROR_LOG_INTERVAL)


def entry_id(item: bytes, tag: str | None) -> str:
    """``msg-<sha1 of the entry>-<tag>``: the same entry popped twice is one dead letter
    when it has a delivery tag; two equal entries without one are two."""
    digest = hashlib.sha1(item).hexdigest()[:20]
    return f"msg-{digest}-{tag or uuid.uuid4().hex}"


class Undeliverable:
    """Dead-letters the queue entries a worker's Redis consumer (reliable fetch or
    :class:`GuardedBrpop`) could not deliver (see the module doc).

    Parameters:
      app: the worker's app (its dead-letter store).
      hostname: the worker's node name, kept in the dead letter.
    """

    def __init__(self, app: Any, hostname: str | None) -> None:
        self.app = app
        self.hostname = hostname

    def __call__(
        self, channel: Any, item: bytes, key: str, queue: str, tag: str | None, exc: Exception
    ) -> bool:
        """Dead-letter ``item`` popped from queue key ``key`` of ``queue``; ``tag`` is
        the delivery tag the fetch script recorded it under (None: not recorded).

        Returns True when it was dead-lettered (or already was), False when it was left
        for a later try.
        """
        entry = record.build(
            entry_id=entry_id(item, tag),
            task_id=None,
            task=None,
            reason="malformed",
            exc=exc,
            queue=queue,
            routing_key=queue,
            hostname=self.hostname,
            body=record.body_text(item),
        )
        try:
            DeadLetterStore(self.app).add(entry)
        except Exception as store_exc:
            instruments.store_error("dead_letter")
            if _write_errors.due():
                logger.error(
                    "celery_reliable: could not dead-letter an undeliverable entry of queue "
                    "%r (%r); %s (logged once per %.0fs)",
                    queue,
                    store_exc,
                    "it stays recorded and comes back to its queue"
                    if tag
                    else "pushed it back on its queue",
                    WRITE_ERROR_LOG_INTERVAL,
                )
            if tag is None:
                with channel.conn_or_acquire() as client:
                    client.lpush(key, item)
            return False
        if tag is not None:
            kr.forget(channel, tag)  # its unacked entry, index and fetch record
        return True


class GuardedBrpop:
    """kombu's BRPOP consumer of one channel, with unreadable entries dead-lettered.

    The same pop as kombu's (its ``_brpop_start`` sends it); the reply is read as kombu's
    ``_brpop_read`` reads it, except that an entry kombu cannot build a message from goes
    to ``undeliverable``. When that fails (the store is down) the entry is back on its
    queue and the channel pauses for :data:`WRITE_PATIENCE` before its next pop, so a
    lone unreadable entry is not looped hot.

    Parameters:
      channel: the worker's task channel (``kombu.transport.redis.Channel``).
      undeliverable: what to do with an unreadable entry.
    """

    def __init__(self, channel: Any, undeliverable: Undeliverable) -> None:
        self.channel = channel
        self.undeliverable = undeliverable
        self.send_pop = kr.kombu_pop(channel)
        self.retry_at = 0.0
        #: Whether the message being delivered reached the QoS (so, the consumer).
        self.handed = False

    def install(self) -> None:
        """Take over the channel's BRPOP reply and watch its QoS appends."""
        kr.install_poll(self.channel, self.start, self.read)
        kr.wrap_qos(self.channel.qos, self._append, _remove)

    def start(self, timeout: Any = None) -> None:
        """Send kombu's BRPOP, unless pausing after a failed dead-letter write."""
        if time.monotonic() >= self.retry_at:
            self.send_pop(timeout)

    def read(self, **options: Any) -> bool:
        """Read the BRPOP reply; deliver its message. Raises Empty when none."""
        try:
            reply = kr.read_reply(self.channel, "BRPOP", **options)
            if not reply:
                raise Empty()
            key, item = bytes_to_str(reply[0]), reply[1]
            queue = key.rsplit(self.channel.sep, 1)[0]
            kr.rotate(self.channel, queue)
            self.handed = False
            try:
                kr.deliver(self.channel, kr.decode_entry(item), queue)
            except Exception as exc:
                if self.handed:
                    raise  # the consumer had the message: its own error, as before
                if not self.undeliverable(self.channel, item, key, queue, None, exc):
                    self.retry_at = time.monotonic() + WRITE_PATIENCE
            return True
        finally:
            kr.done_reading(self.channel)

    def _append(self, original: Any, message: Any, delivery_tag: Any) -> Any:
        result = original(message, delivery_tag)
        self.handed = True
        return result


def _remove(original: Any, delivery_tag: Any, pipe: Any) -> Any:
    return original(delivery_tag, pipe)
