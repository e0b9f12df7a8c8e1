"""A worker declared dead while alive must not acknowledge messages it gave up.

When a reaper declares a worker dead (it was paused or cut off from Redis for longer than
``reliable_worker_timeout``), it puts the worker's messages back on their queues, and
another worker may already be running them. The restored message keeps its delivery tag,
so the paused worker's late acknowledgement would delete the *other* worker's entry from
kombu's ``unacked`` hash: if that worker then died too, nothing could bring the task back.

This consumer step wraps the task channel's QoS ``ack``/``reject`` (Redis broker only).
For a tag the worker surrendered (held when the reaper took it), only the local bookkeeping
is done and nothing is sent to Redis, until the same message is delivered to this worker
again (``append``), which makes it this worker's to acknowledge again.

A withheld acknowledgement means the task finished here although its message was given back
(and runs again elsewhere): on a worker that receives with reliable fetch (whose ReliableTasks
have no ledger entry to find missing) it is logged as having probably run twice and counted
(``duplicates`` in the status; one store round trip, on this rare path only).

The check costs one clock read per ack while the heartbeat is fresh; when the last
successful heartbeat is older than the worker timeout (the worker may have been reaped),
the first ack waits up to :data:`REAPED_CHECK_WAIT` seconds for the heartbeat thread to
find out, once per stale episode.

Examples:
    >>> app.steps["consumer"].add(AckGuardStep)      # done by install(app)
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.transport.virtual.base import QoS as VirtualQoS

from ..core.broker import broker_is_redis
from ..core.store import STORE_ERRORS, store_for
from .registry import RegistryKeys, current_heartbeat, worker_fetches

logger = logging.getLogger(__name__)

#: Seconds the first ack after a long silence waits for the heartbeat to report.
REAPED_CHECK_WAIT = 2.0


class AckGuardStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: no broker ack or requeue for messages a reaper already gave back."""

    label = "reliable-ack-guard"
    # After reliable fetch, so that this guard wraps the QoS that fetch extended.
    requires = ("celery.worker.consumer.tasks:Tasks", "celery_reliable.orphans.fetch:FetchStep")

    def start(self, c: Any) -> None:
        heart = current_heartbeat()
        consumer = getattr(c, "task_consumer", None)
        if heart is None or consumer is None or not broker_is_redis(c.app):
            return
        qos = consumer.channel.qos
        if getattr(qos, "_reliable_guarded", False):
            return
        original_ack, original_reject = qos.ack, qos.reject

        # On a healthy worker the first test is the whole cost of an ack (one clock read);
        # the tag is looked at only when a reap happened or the heartbeat went stale.
        def ack(delivery_tag: Any) -> None:
            if heart.all_clear():
                original_ack(delivery_tag)
                return
            if heart.surrendered(str(delivery_tag), REAPED_CHECK_WAIT):
                _skip(qos, delivery_tag, "acknowledge")
                if worker_fetches():
                    _count_duplicate(c.app, heart.registry.worker_id, delivery_tag)
                return
            original_ack(delivery_tag)

        def reject(delivery_tag: Any, requeue: bool = False) -> None:
            if heart.all_clear():
                original_reject(delivery_tag, requeue=requeue)
                return
            if heart.surrendered(str(delivery_tag), REAPED_CHECK_WAIT):
                _skip(qos, delivery_tag, "requeue" if requeue else "reject")
                return
            original_reject(delivery_tag, requeue=requeue)

        original_append = qos.append

        def append(message: Any, delivery_tag: Any) -> None:
            heart.reclaim(str(delivery_tag))  # delivered to us again: ours to ack again
            original_append(message, delivery_tag)

        qos.ack, qos.reject, qos.append = ack, reject, append
        qos._reliable_guarded = True
        heart.watch_qos(qos)


def _skip(qos: Any, delivery_tag: Any, what: str) -> None:
    VirtualQoS.ack(qos, delivery_tag)  # local bookkeeping only (prefetch slot, _delivered)
    logger.warning(
        "celery_reliable: not sending the %s of message %s to the broker: a reaper gave it "
        "back while this worker was declared dead, and another worker may hold it now",
        what,
        delivery_tag,
    )


def _count_duplicate(app: Any, worker_id: str, delivery_tag: Any) -> None:
    logger.warning(
        "celery_reliable: message %s finished on worker %s after a reaper had declared the "
        "worker dead and given the message back: its task has probably run twice",
        delivery_tag,
        worker_id,
    )
    store = store_for(app)
    try:
        store.client.hincrby(RegistryKeys(store).stats, "duplicates", 1)
    except STORE_ERRORS as exc:
        logger.warning("celery_reliable: could not count the duplicate (%r)", exc)
