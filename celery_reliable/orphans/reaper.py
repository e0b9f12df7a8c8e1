"""The orphan reaper: recover the in-flight tasks of workers that stopped heartbeating.

One pass (:meth:`Reaper.run_pass`) reads the registry for workers whose last heartbeat is
older than ``reliable_worker_timeout`` (a range read of one ZSET; the keyspace is never
scanned), claims each one atomically (so several reapers never recover the same worker
twice) and recovers everything it held:

- **Redis broker.** Each task in the worker's ledger is put back on its queue by restoring
  *that very message* from kombu's ``unacked`` hash (WATCH/MULTI, as kombu's own
  ``restore_by_tag`` does): it leaves ``unacked``, so the broker's visibility timeout never
  brings it back a second time. Its orphan count goes up; when it
  reaches ``reliable_max_recoveries`` it is dead-lettered (reason ``orphaned``, with its arguments
  read from the message) and removed from ``unacked`` instead. Messages the worker had
  prefetched but not started (reported by its heartbeat) are restored too, without counting.
  With reliable fetch the worker's fetch record is its in-flight record: a ReliableTask's
  first delivery writes no ledger entry, so its record entry counts like one unless the
  worker's last heartbeat reported it still waiting (not handed to the pool).
  A message is only restored if the dead worker is still its latest receiver (its
  ``unacked_index`` score is not newer than when the worker started or reported it).
- **RabbitMQ.** The broker already redelivered the dead consumer's unacknowledged messages
  when its connection dropped: nothing is published. The reaper clears the worker's ledger
  and registration and counts the recovery; the ledger's start check then dead-letters a
  task recovered too often.

The CLI (``celery -A APP reliable-reaper``) and tests call the same :class:`Reaper`.

Examples:
    >>> reaper = Reaper(app)
    >>> result = reaper.run_pass()
    >>> [(r.task_id, r.action) for r in result.recoveries]
    [('4c1f...', 'restored')]
    >>> reaper.run_forever(interval=2.0)      # until stop is set / SIGTERM in the CLI
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str

from ..core import compat
from ..core.broker import broker_is_redis
from ..core.state import settings_of
from ..core.store import store_for
from ..deadletters import record
from ..deadletters.record import DeadLetter
from ..deadletters.store import DeadLetterStore
from ..task import ReliableTask
from .ledger import RecoveredTooOften
from .registry import (
    REAPED_MARKER_TTL,
    RECOVERY_COUNT_TTL,
    STARTED_MARK,
    RegistryKeys,
    presence_name,
    record_key,
)
from .scripts import REAPER_CLAIM, REAPER_EPOCH, REAPER_RECLAIM
from .undeliverable import entry_id

logger = logging.getLogger(__name__)

#: Dead workers claimed per pass at most (the rest wait for the next pass).
CLAIM_BATCH = 100
#: Seconds after which another reaper may take over a claim whose reaper did not finish.
CLAIM_LEASE = 60.0
#: Times a dead worker's fetch record is read (a late pop may still land after the first).
RECORD_READS = 2
#: Most unacknowledged messages one pass examines for the unclaimed-message sweep.
SWEEP_BATCH = 1000
#: What reading an ``unacked`` entry that is not a kombu message raises: not JSON, not
#: ``[payload, exchange, routing key]``, or a payload kombu cannot build a message from.
UNREADABLE_ERRORS = (ValueError, TypeError, KeyError, AttributeError)


@dataclass(frozen=True)
class Recovery:
    """What the reaper did with one message of a dead worker.

    ``action`` is one of ``restored`` (back on its queue), ``dead_lettered`` (recovered
    too often, or an ``unacked`` entry that is no readable message: dead-lettered as
    ``malformed`` instead of failing every pass), ``broker_redelivers`` (AMQP: the
    broker already did it), ``restored_prefetched`` (prefetched, never started),
    ``gone`` (no longer unacknowledged: acked or already restored), ``moved`` (another
    worker received it since) or ``error`` (an unreadable ledger entry, logged).
    """

    worker_id: str
    node: str | None
    task_id: str | None
    task: str | None
    tag: str | None
    action: str
    recoveries: int = 0


@dataclass
class PassResult:
    """One reaper pass: the workers declared dead and what happened to their messages."""

    dead_workers: list[str] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)


def broker_key(client: Any, key: str) -> str:
    """``key`` with kombu's ``global_keyprefix``, for the commands kombu's prefixing client
    does not prefix itself (such as ZSCORE)."""
    return compat.key_prefix(client) + key


class RedisBrokerRestorer:
    """Restores or removes single messages in kombu's Redis ``unacked`` hash.

    Parameters:
      app: the app, whose broker URL and ``broker_transport_options`` (``global_keyprefix``,
        ``unacked_key``...) are used exactly as its workers use them.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._conn: Any = None
        self._channel: Any = None

    @property
    def channel(self) -> Any:
        if self._channel is None:
            conn = self.app.connection_for_write()
            conn.ensure_connection(max_retries=3)
            self._conn, self._channel = conn, conn.default_channel
        return self._channel

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # closing a broken connection: nothing left to do
                logger.debug("closing the broker connection failed", exc_info=True)

    def restore(self, tag: str, not_after: float | None) -> str:
        """Put the message back on its queue (``restored``), unless it is ``gone`` from
        ``unacked``, was received again after ``not_after`` (``moved``), or is no readable
        message (``unreadable``: left as it is, for :meth:`Reaper.dead_letter_unreadable`)."""
        channel = self.channel
        qos = channel.qos
        outcome = ["gone"]

        def transaction(pipe: Any) -> None:
            raw = pipe.hget(qos.unacked_key, tag)
            score = pipe.zscore(broker_key(pipe, qos.unacked_index_key), tag)
            pipe.multi()
            if not raw:
                outcome[0] = "gone"
                return
            if not_after is not None and score is not None and float(score) > not_after:
                outcome[0] = "moved"
                return
            try:
                payload, exchange, routing_key = json.loads(bytes_to_str(raw))
                check_restorable(payload)
                channel.Message(payload, channel=channel)  # kombu could deliver it again
            except UNREADABLE_ERRORS:
                outcome[0] = "unreadable"
                return
            compat.remove_from_unacked_indices(qos, tag, pipe)
            compat.restore_unacked_message(channel, payload, exchange, routing_key, pipe)
            outcome[0] = "restored"

        with channel.conn_or_acquire() as client:
            client.transaction(transaction, qos.unacked_key)
        return outcome[0]

    def record(self, key: str) -> dict[str, dict[str, Any]]:
        """The entries of fetch record ``key``: delivery tag -> {t, id, task, q}."""
        channel = self.channel
        with channel.conn_or_acquire() as client:
            raw = client.hgetall(broker_key(client, key))  # kombu does not prefix HGETALL
        entries: dict[str, dict[str, Any]] = {}
        for tag, value in raw.items():
            try:
                entry = json.loads(bytes_to_str(value))
            except ValueError:
                entry = None
            entries[bytes_to_str(tag)] = entry if isinstance(entry, dict) else {}
        return entries

    def record_tags(self, keys: list[str]) -> set[str]:
        """Delivery tags in any of the fetch records ``keys``."""
        if not keys:
            return set()
        channel = self.channel
        tags: set[str] = set()
        with channel.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("HKEYS", broker_key(client, key))  # not prefixed either
            for reply in pipe.execute():
                tags.update(bytes_to_str(t) for t in reply or ())
        return tags

    def forget(self, key: str, tags: list[str]) -> None:
        """Remove ``tags`` from fetch record ``key`` (kombu prefixes HDEL itself)."""
        if tags:
            with self.channel.conn_or_acquire() as client:
                client.hdel(key, *tags)

    def raw(self, tag: str) -> str | None:
        """The raw ``unacked`` entry of ``tag`` (None when gone)."""
        with self.channel.conn_or_acquire() as client:
            raw = client.hget(self.channel.qos.unacked_key, tag)
        return None if raw is None else bytes_to_str(raw)

    def read(self, tag: str, not_after: float | None) -> tuple[str, Any] | None:
        """The raw ``unacked`` entry and its decoded message, or None when gone/moved.

        Raises:
            ValueError, TypeError, KeyError, AttributeError: the entry is no readable
                message (:data:`UNREADABLE_ERRORS`).
        """
        channel = self.channel
        qos = channel.qos
        with channel.conn_or_acquire() as client:
            raw = client.hget(qos.unacked_key, tag)
            score = client.zscore(broker_key(client, qos.unacked_index_key), tag)
        if not raw or (not_after is not None and score is not None and float(score) > not_after):
            return None
        payload, exchange, routing_key = json.loads(bytes_to_str(raw))
        message = channel.Message(payload, channel=channel)
        return bytes_to_str(raw), (message, exchange, routing_key)

    def remove(self, tag: str, raw: str) -> bool:
        """Remove the entry from ``unacked`` if it is still ``raw``; True when removed."""
        channel = self.channel
        qos = channel.qos
        removed = [False]

        def transaction(pipe: Any) -> None:
            current = pipe.hget(qos.unacked_key, tag)
            pipe.multi()
            if current is not None and bytes_to_str(current) == raw:
                compat.remove_from_unacked_indices(qos, tag, pipe)
                removed[0] = True

        with channel.conn_or_acquire() as client:
            client.transaction(transaction, qos.unacked_key)
        return removed[0]


def check_restorable(payload: Any) -> None:
    """Raise TypeError unless kombu can put ``payload`` back on a queue: its restore marks
    ``headers`` and ``properties.delivery_info`` as redelivered and, when either is not a
    mapping, logs the error and drops the message (already out of ``unacked``)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
        raise TypeError("not a kombu envelope")
    for name, part in (("headers", payload), ("delivery_info", payload["properties"])):
        if name in part and not isinstance(part[name], dict):
            raise TypeError(f"{name} is {type(part[name]).__name__}, not a mapping")


def orphaned_dead_letter(
    message: Any,
    exchange: str | None,
    routing_key: str | None,
    recoveries: int,
    node: str | None,
    limit: int,
) -> DeadLetter:
    """A dead letter (reason ``orphaned``) for a message read from ``unacked``."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id") or message.delivery_tag
    return record.from_message(
        message,
        "orphaned",
        exc=RecoveredTooOften(str(task_id), recoveries, limit),
        hostname=node,
        exchange=exchange,
        routing_key=routing_key,
    )


class Reaper:
    """Finds dead workers and recovers their in-flight tasks (see the module docstring).

    Parameters:
      app: the Celery app (its broker and ``reliable_*`` settings).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = settings_of(app)
        self.store = store_for(app)
        self.keys = RegistryKeys(self.store)
        self.redis_broker = broker_is_redis(app)
        self.restorer = RedisBrokerRestorer(app) if self.redis_broker else None
        self._pending: dict[str, str | None] = {}  # claimed worker id -> node name
        self._epoch: str | None = None  # the registry generation seen by the last pass
        self._judge_after = 0.0  # Redis time before which no worker is judged
        self._presence_failing = False
        conn = app.connection_for_write()
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            *conn.connection_errors,
            *conn.channel_errors,
        )

    # --- one pass ---

    def run_pass(self) -> PassResult:
        """Claim every dead worker and recover what it held. Safe to run concurrently."""
        result = PassResult()
        client: Any = self.store.client
        k = self.keys
        clock = self._registry_clock()
        if clock is None:
            return result
        gone, seen_at = self._connections_gone()
        for wid in client.zrangebyscore(
            k.claims, "-inf", clock - CLAIM_LEASE, start=0, num=CLAIM_BATCH
        ):
            if self.store.run(REAPER_RECLAIM, keys=[k.claims], args=[wid, CLAIM_LEASE]):
                logger.warning("reaper: taking over the unfinished recovery of worker %s", wid)
                self._pending.setdefault(wid, None)
        expired = client.zrangebyscore(
            k.workers, "-inf", clock - self.settings.worker_timeout, start=0, num=CLAIM_BATCH
        )
        for wid, gone_at in [*((w, seen_at) for w in gone), *((w, None) for w in expired)]:
            claimed, node = self._claim(wid, gone_at)
            if claimed:
                result.dead_workers.append(wid)
                self._pending[wid] = node
        for wid, node in list(self._pending.items()):
            recovered = self._recover_worker(wid, node)
            result.recoveries.extend(recovered)
            del self._pending[wid]
        if self.restorer is not None:
            swept = self._sweep_unclaimed(clock)
            result.recoveries.extend(swept)
        return result

    def _registry_clock(self) -> float | None:
        """Redis time now, or None while the registry is too young to judge anyone.

        A registry that began (or changed generation) less than ``reliable_worker_timeout``
        ago may lack live workers that have not heartbeated since the store lost its data;
        judging then would give back messages that live workers hold.
        """
        epoch, now = self.store.run(
            REAPER_EPOCH, keys=[self.keys.epoch, self.keys.workers], args=[]
        )
        clock = float(now)
        timeout = self.settings.worker_timeout
        if epoch != self._epoch:
            if self._epoch is not None:  # a new generation under this reaper's eyes
                self._judge_after = clock + timeout
            self._epoch = epoch
            young = max(float(epoch) + timeout, self._judge_after) - clock
            if young > 0:
                logger.warning(
                    "reaper: the store's worker registry is new (began %.1fs ago: a fresh "
                    "store, or one that lost its data); judging no worker for %.1fs, until "
                    "every live worker has heartbeated again (reliable_worker_timeout=%.1fs)",
                    clock - float(epoch),
                    young,
                    timeout,
                )
        if clock < max(float(epoch) + timeout, self._judge_after):
            return None
        return clock

    def _connections_gone(self) -> tuple[list[str], float]:
        """Registered workers whose presence connection to the store is gone, and the time
        (Redis clock) that was seen at.

        A worker's main process holds a store connection named after it
        (:attr:`~celery_reliable.orphans.registry.WorkerRegistry.presence`); the kernel
        closes it when the process dies, however it dies, so its absence from ``CLIENT
        LIST`` is death seen at once. A paused process keeps its connection. Nobody is
        judged this way while the store has been up for less than
        ``reliable_worker_timeout`` (after a restart every live worker needs a heartbeat to
        reconnect), nor a worker that never said it holds such a connection.
        """
        client: Any = self.store.client
        if self._presence_failing or not isinstance(client, redis.Redis):
            # a Redis Cluster store: connections are per node, judge by heartbeats only
            seconds, micros = client.time()
            return [], seconds + micros / 1e6
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.zrange(self.keys.workers, 0, -1)
        pipe.client_list(_type="normal")
        pipe.info("server")
        try:
            (seconds, micros), workers, clients, info = pipe.execute()
        except redis.ResponseError as exc:  # CLIENT LIST refused (ACL), or not a server
            logger.warning(
                "reaper: cannot list the store's connections (%r); dead workers are found by"
                " their heartbeat timeout only",
                exc,
            )
            self._presence_failing = True
            seconds, micros = client.time()
            return [], seconds + micros / 1e6
        clock = seconds + micros / 1e6
        if int(info.get("uptime_in_seconds", 0)) < self.settings.worker_timeout:
            return [], clock
        names = {c.get("name") for c in clients}
        prefix = self.settings.key_prefix
        absent = [w for w in workers if presence_name(prefix, w) not in names]
        if not absent:
            return [], clock
        gone = []
        for wid, raw in zip(absent, client.hmget(self.keys.info, absent), strict=True):
            try:
                said = json.loads(raw).get("presence") if raw else None
            except (ValueError, AttributeError):
                said = None
            if said == presence_name(prefix, wid):
                gone.append(wid)
        return gone, clock

    def _claim(self, wid: str, gone_at: float | None) -> tuple[bool, str | None]:
        """Claim dead worker ``wid`` (its connection seen gone at ``gone_at``, or its
        heartbeat expired): (claimed, node name). Not claimed when it is alive after all
        or another reaper claimed it."""
        k = self.keys
        claimed = self.store.run(
            REAPER_CLAIM,
            keys=[
                k.workers,
                k.info,
                k.ledger(wid),
                k.held(wid),
                k.claimed_ledger(wid),
                k.claimed_held(wid),
                k.claims,
                k.reaped(wid),
            ],
            args=[
                wid,
                self.settings.worker_timeout,
                REAPED_MARKER_TTL,
                "" if gone_at is None else repr(gone_at),
            ],
        )
        if not claimed:
            return False, None
        info = json.loads(claimed[1]) if claimed[1] else {}
        node: str | None = info.get("node")
        if gone_at is not None:
            why = f"its store connection closed (last heartbeat {float(claimed[2]):.1f}s ago)"
        else:
            why = (
                f"no heartbeat for {float(claimed[2]):.1f}s "
                f"(reliable_worker_timeout={self.settings.worker_timeout:.1f}s)"
            )
        logger.warning("reaper: worker %s (%s) is dead: %s; recovering its tasks", wid, node, why)
        return True, node

    def _claimed_tags(self) -> set[str]:
        """Delivery tags some registered worker (alive, or dead and not yet recovered) or an
        unfinished claim holds: from the heartbeats' held reports and the ledgers."""
        client: Any = self.store.client
        k = self.keys
        workers = client.zrange(k.workers, 0, -1)
        claims = client.zrange(k.claims, 0, -1)
        pipe = client.pipeline(transaction=False)
        for wid in workers:
            pipe.hkeys(k.held(wid))
            pipe.hvals(k.ledger(wid))
        for wid in claims:
            pipe.hkeys(k.claimed_held(wid))
            pipe.hvals(k.claimed_ledger(wid))
        tags: set[str] = set()
        if self.restorer is not None:
            prefix = self.settings.key_prefix
            tags = self.restorer.record_tags([record_key(prefix, w) for w in (*workers, *claims)])
        replies = pipe.execute()
        for held, ledger in zip(replies[::2], replies[1::2], strict=True):
            tags.update(held)
            for raw in ledger:
                try:
                    tag = json.loads(raw).get("tag")
                except (ValueError, AttributeError):
                    continue
                if tag:
                    tags.add(str(tag))
        return tags

    def _sweep_unclaimed(self, clock: float) -> list[Recovery]:
        """Give back ReliableTask messages that no worker holds any more.

        A worker reports the tags it holds on every heartbeat, so a message it received
        after its last heartbeat and before it died is in no report. Any message of a
        ReliableTask delivered more than ``reliable_worker_timeout`` ago that no
        registered worker reports holding, and no claim covers, belongs to a dead worker:
        it is restored like a prefetched one (the ``moved`` guard skips it if it was
        received again in the meantime).
        """
        assert self.restorer is not None
        channel = self.restorer.channel
        qos = channel.qos
        cutoff = clock - self.settings.worker_timeout
        with channel.conn_or_acquire() as broker:
            candidates = broker.zrange(  # ZRANGE: a command kombu's key prefix applies to
                qos.unacked_index_key,
                "-inf",
                cutoff,
                byscore=True,
                offset=0,
                num=SWEEP_BATCH,
                withscores=True,
            )
        if not candidates:
            return []
        claimed = self._claimed_tags()
        done: list[Recovery] = []
        for raw_tag, score in candidates:
            tag = bytes_to_str(raw_tag)
            if tag in claimed:
                continue
            try:
                found = self.restorer.read(tag, float(score))
                if found is None:
                    continue
                message = found[1][0]
                headers = message.headers if isinstance(message.headers, dict) else {}
                name = headers.get("task")
            except UNREADABLE_ERRORS as exc:  # no worker can hold it: kombu cannot read it
                done.append(self.dead_letter_unreadable("", None, tag, exc))
                continue
            if not isinstance(self.app.tasks.get(name), ReliableTask):
                continue  # not ours: a plain worker may hold it
            action = self.restorer.restore(tag, float(score))
            if action == "unreadable":
                done.append(self.dead_letter_unreadable("", None, tag, None))
                continue
            if action == "restored":
                action = "restored_unclaimed"
                self.store.client.hincrby(self.keys.stats, "restored_unclaimed", 1)
                logger.warning(
                    "reaper: gave back %s[%s] (message %s): delivered %.1fs ago and held by "
                    "no live worker (its worker died after its last heartbeat)",
                    name,
                    headers.get("id"),
                    tag,
                    clock - float(score),
                )
            done.append(Recovery("", None, headers.get("id"), name, tag, action))
        return done

    def dead_letter_unreadable(
        self, wid: str, node: str | None, tag: str, exc: Exception | None
    ) -> Recovery:
        """Dead-letter (``malformed``) the ``unacked`` entry ``tag`` that is no message
        kombu can read, and remove it: restoring it would fail (or push back what no
        worker can run), and reading it again would fail every pass."""
        assert self.restorer is not None
        raw = self.restorer.raw(tag)
        if raw is None:
            return Recovery(wid, node, None, None, tag, "gone")
        entry = record.build(
            entry_id=entry_id(raw.encode("utf-8", "replace"), tag),
            task_id=None,
            task=None,
            reason="malformed",
            exc=exc or ValueError("not a message kombu can read"),
            hostname=node,
            body=record.body_text(raw),
        )
        DeadLetterStore(self.app).add(entry)  # idempotent by entry id: safe to repeat
        self.restorer.remove(tag, raw)
        self.store.client.hincrby(self.keys.stats, "dead_lettered", 1)
        logger.error(
            "reaper: unacknowledged message %s is not a message kombu can read (%r); "
            "dead-lettered as 'malformed' (entry %s) and removed",
            tag,
            exc,
            entry.id,
        )
        return Recovery(wid, node, None, None, tag, "dead_lettered")

    def _recover_worker(self, wid: str, node: str | None) -> list[Recovery]:
        client: Any = self.store.client
        k = self.keys
        ledger = client.hgetall(k.claimed_ledger(wid))
        held = client.hgetall(k.claimed_held(wid))
        done: list[Recovery] = []
        started_tags = set()
        for task_id, raw in sorted(ledger.items()):
            try:
                entry = json.loads(raw)
                if entry.get("tag"):
                    started_tags.add(str(entry["tag"]))
                done.append(self._recover_started(wid, node, task_id, entry))
            except self._errors:
                raise  # Redis or broker trouble: the whole claim is retried next pass
            except Exception:
                logger.exception("reaper: cannot recover %s of worker %s (%r)", task_id, wid, raw)
                done.append(Recovery(wid, node, task_id, None, None, "error"))
        if self.restorer is not None:
            done.extend(self._recover_received(wid, node, held, started_tags))
        pipe = client.pipeline(transaction=True)
        pipe.delete(k.claimed_ledger(wid), k.claimed_held(wid))
        pipe.zrem(k.claims, wid)
        pipe.hincrby(k.stats, "dead_workers", 1)
        pipe.execute()
        return done

    def _recover_received(
        self, wid: str, node: str | None, held: dict[str, str], started: set[str]
    ) -> list[Recovery]:
        """Give back what the dead worker received but had not started (or started as a
        plain task, which has no ledger entry): every entry of its fetch record (reliable
        fetch), plus the delivery tags its last heartbeat reported (workers without it).

        The fetch record is also the in-flight record of the ReliableTasks it delivered for
        the first time (they write no ledger entry): such an entry counts a recovery like a
        ledger entry unless the last heartbeat reported its message as still waiting in
        the worker (not handed to the pool), since the task may have started and killed
        its worker (:meth:`_counts`)."""
        assert self.restorer is not None
        client: Any = self.store.client
        record = record_key(self.settings.key_prefix, wid)
        started = set(started)
        waiting = {tag for tag, value in held.items() if not value.startswith(STARTED_MARK)}
        given: dict[str, tuple[float | None, Any, Any, bool]] = {
            tag: (float(reported), None, None, False) for tag, reported in held.items()
        }
        done = []
        # Read the record twice: a pop the dead process sent just before it died may run on
        # the broker after its store connection was seen closed (two servers, or two
        # connections of one server closing in either order).
        for _ in range(RECORD_READS):
            fetched = self.restorer.record(record)
            for tag, entry in fetched.items():
                t = entry.get("t")  # its unacked_index score: a later delivery is "moved"
                counts = tag not in waiting and self._counts(entry)
                given[tag] = (float(t) if t else None, entry.get("id"), entry.get("task"), counts)
            for tag, (not_after, task_id, name, counts) in sorted(given.items()):
                if tag in started:
                    continue
                if counts:
                    entry = {"task": name, "tag": tag, "t": not_after}
                    done.append(self._recover_started(wid, node, str(task_id), entry))
                    continue
                action = self.restorer.restore(tag, not_after)
                if action == "unreadable":
                    done.append(self.dead_letter_unreadable(wid, node, tag, None))
                    continue
                if action == "restored":
                    action = "restored_prefetched"
                    client.hincrby(self.keys.stats, "restored_prefetched", 1)
                    logger.warning(
                        "reaper: gave back prefetched message %s (%s[%s]) of dead worker %s",
                        tag,
                        name,
                        task_id,
                        wid,
                    )
                done.append(Recovery(wid, node, task_id, name, tag, action))
            self.restorer.forget(record, sorted(fetched))
            if not fetched:
                break
            started |= set(given)
            given = {}
        return done

    def _counts(self, entry: dict[str, Any]) -> bool:
        """Whether a fetch-record entry counts a recovery: a ReliableTask's message
        delivered for the first time (a redelivered one writes a ledger entry at start)."""
        name = entry.get("task")
        return (
            bool(entry.get("id"))
            and not entry.get("r")
            and isinstance(self.app.tasks.get(name), ReliableTask)
        )

    def _recover_started(
        self, wid: str, node: str | None, task_id: str, entry: dict[str, Any]
    ) -> Recovery:
        client: Any = self.store.client
        k = self.keys
        count_key = k.recoveries(task_id)
        name, tag = entry.get("task"), entry.get("tag")
        limit = self.settings.max_recoveries
        if self.restorer is None:
            # AMQP: the broker redelivered it when the connection dropped; only count it.
            pipe = client.pipeline(transaction=True)
            pipe.incr(count_key)
            pipe.expire(count_key, RECOVERY_COUNT_TTL)
            pipe.hincrby(k.stats, "recovered", 1)
            count = int(pipe.execute()[0])
            logger.warning(
                "reaper: %s[%s] of dead worker %s (%s): redelivered by the broker, not "
                "published again (recovery %d of %d)",
                name,
                task_id,
                wid,
                node,
                count,
                limit,
            )
            return Recovery(wid, node, task_id, name, tag, "broker_redelivers", count)
        if not tag:
            logger.error("reaper: %s[%s] of worker %s has no delivery tag", name, task_id, wid)
            return Recovery(wid, node, task_id, name, tag, "gone")
        count = int(client.get(count_key) or 0) + 1
        started = float(entry.get("t") or 0) or None
        if count >= limit:  # orphaned reliable_max_recoveries times (reliable_max_recoveries)
            return self._dead_letter(wid, node, task_id, name, str(tag), started, count)
        action = self.restorer.restore(str(tag), started)
        if action == "unreadable":
            return self.dead_letter_unreadable(wid, node, str(tag), None)
        if action == "restored":
            pipe = client.pipeline(transaction=True)
            pipe.set(count_key, count, ex=RECOVERY_COUNT_TTL)
            pipe.hincrby(k.stats, "recovered", 1)
            pipe.execute()
            logger.warning(
                "reaper: recovered %s[%s] of dead worker %s (%s): message %s back on its "
                "queue (recovery %d of %d)",
                name,
                task_id,
                wid,
                node,
                tag,
                count,
                limit,
            )
        else:
            logger.info(
                "reaper: %s[%s] of dead worker %s: message %s %s, nothing to do",
                name,
                task_id,
                wid,
                tag,
                "already acknowledged or restored" if action == "gone" else "received again",
            )
        return Recovery(wid, node, task_id, name, str(tag), action, count)

    def _dead_letter(
        self,
        wid: str,
        node: str | None,
        task_id: str,
        name: str | None,
        tag: str,
        started: float | None,
        count: int,
    ) -> Recovery:
        assert self.restorer is not None
        try:
            found = self.restorer.read(tag, started)
        except UNREADABLE_ERRORS as exc:
            return self.dead_letter_unreadable(wid, node, tag, exc)
        if found is None:
            return Recovery(wid, node, task_id, name, tag, "gone", count)
        raw, (message, exchange, routing_key) = found
        entry = orphaned_dead_letter(
            message, exchange, routing_key, count, node, self.settings.max_recoveries
        )
        DeadLetterStore(self.app).add(entry)  # idempotent by task id: safe to repeat
        self.restorer.remove(tag, raw)
        client: Any = self.store.client
        pipe = client.pipeline(transaction=True)
        pipe.delete(self.keys.recoveries(task_id))
        pipe.hincrby(self.keys.stats, "dead_lettered", 1)
        pipe.execute()
        logger.error(
            "reaper: %s[%s] was orphaned %d times (reliable_max_recoveries=%d): dead-lettered"
            " as 'orphaned' instead of recovered",
            name,
            task_id,
            count,
            self.settings.max_recoveries,
        )
        return Recovery(wid, node, task_id, name, tag, "dead_lettered", count)

    # --- running ---

    def note_pass(self, seconds: float, result: PassResult) -> None:
        """Record a finished pass in the store (``status`` shows the last one)."""
        self.store.client.hset(
            self.keys.last_pass,
            mapping={
                "at": repr(time.time()),
                "seconds": repr(round(seconds, 6)),
                "by": f"{socket.gethostname()}:{os.getpid()}",
                "dead_workers": len(result.dead_workers),
                "recoveries": len(result.recoveries),
            },
        )

    def run_forever(
        self,
        interval: float | None = None,
        stop: threading.Event | None = None,
        on_pass: Callable[[float, PassResult | None], None] | None = None,
    ) -> None:
        """Run passes every ``interval`` seconds (``reliable_reaper_interval``) until
        ``stop`` is set. Redis or broker outages are logged and retried, never fatal.

        ``on_pass(seconds, result)`` is called after each pass (``result`` None when it
        failed); the CLI's metrics exporter reads the cluster's state there.
        """
        interval = interval or self.settings.reaper_interval
        stop = stop or threading.Event()
        failing = False
        while not stop.is_set():
            started = time.monotonic()
            result: PassResult | None = None
            try:
                result = self.run_pass()
                self.note_pass(time.monotonic() - started, result)
                if failing:
                    logger.warning("reaper: passes succeed again")
                failing = False
            except self._errors as exc:
                if not failing:
                    logger.error("reaper: pass failed (%r); retrying every %.1fs", exc, interval)
                failing = True
                if self.restorer is not None:
                    self.restorer.close()
            except Exception:
                logger.exception("reaper: pass failed; retrying in %.1fs", interval)
                if self.restorer is not None:
                    self.restorer.close()
            if on_pass is not None:
                on_pass(time.monotonic() - started, result)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def close(self) -> None:
        if self.restorer is not None:
            self.restorer.close()


def last_pass(app: Any) -> dict[str, Any]:
    """The last pass any reaper recorded (``at``, ``seconds``, ``by``...), or ``{}``."""
    store = store_for(app)
    raw: dict[str, str] = store.client.hgetall(RegistryKeys(store).last_pass)  # type: ignore[assignment]
    out: dict[str, Any] = dict(raw)
    for name in ("at", "seconds"):
        if name in out:
            out[name] = float(out[name])
    return out
