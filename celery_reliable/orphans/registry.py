"""Worker registry: every worker has a unique id, heartbeats into Redis, and deregisters.

A worker bootstep gives the worker, before its pool forks, an id made of the host name, the
MainProcess pid and a random part (``host:1234:9f2c01ab``; the same host restarting is a new
worker). Pool processes inherit it, so the in-flight ledger (:mod:`celery_reliable.orphans.ledger`)
files each task under its worker. A thread of the MainProcess heartbeats every
``reliable_heartbeat_interval`` seconds (independent of Celery's gossip and heartbeat
events) and reports the broker delivery tags the worker holds (prefetched and running), so
a reaper can give those back too when the worker dies (:mod:`celery_reliable.orphans.reaper`). A
warm shutdown deregisters the worker after its pool has stopped; a cold one right away.

Keys (one ``{reaper}`` hash tag, so every script also runs on Redis Cluster)::

    <prefix>:{reaper}:workers          ZSET  worker id -> last heartbeat (Redis clock)
    <prefix>:{reaper}:info             HASH  worker id -> JSON (node name, host, pid...)
    <prefix>:{reaper}:ledger:<id>      HASH  task id -> JSON (delivery tag, task, route)
    <prefix>:{reaper}:held:<id>        HASH  delivery tag -> report time (worker clock)
    <prefix>:{reaper}:reaped:<id>      STRING a reaper declared this worker dead
    <prefix>:{reaper}:rec:<task id>    STRING recoveries of that task (expires)
    <prefix>:{reaper}:claims           ZSET  worker id -> claim time (reaper at work)
    <prefix>:{reaper}:stats            HASH  counters (recovered, dead_lettered...)

Examples:
    >>> celery_reliable.install(app)          # adds the bootstep
    >>> [w["node"] for w in live_workers(app)]
    ['w1@host']
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawValue
from typing import Any

import redis
from kombu.exceptions import KombuError
from kombu.utils.url import maybe_sanitize_url

from ..core import compat, instruments
from ..core.broker import broker_is_redis
from ..core.config import parse_store_url
from ..core.state import settings_of
from ..core.store import RedisStore, make_client, store_for
from ..errors import ConfigurationError
from .scripts import DEREGISTER, HEARTBEAT

logger = logging.getLogger(__name__)

#: Seconds a "you were declared dead" marker waits for its (paused) worker to read it.
REAPED_MARKER_TTL = 24 * 3600
#: Marks a reported held tag as handed to the pool: heartbeat.lua stores the report time
#: with this sign before it, which ``float()`` still reads (reapers of earlier releases).
STARTED_MARK = "+"
#: Seconds ``status`` waits for a broker connection to read the fetch records (one
#: attempt: a broker that is down makes the in-flight counts fall back at once).
BROKER_READ_TIMEOUT = 5.0
#: Seconds a task's recovery count is kept after its last recovery.
RECOVERY_COUNT_TTL = 7 * 24 * 3600
#: Attempts at copying the reserved-requests set while the event loop mutates it.
SNAPSHOT_ATTEMPTS = 5
#: First pause, in seconds, between attempts at registering with an unreachable store; it
#: doubles after each attempt, up to :data:`REGISTER_BACKOFF_MAX`.
REGISTER_BACKOFF = 0.5
REGISTER_BACKOFF_MAX = 10.0

_current_worker_id: str | None = None
_current_heartbeat: Heartbeat | None = None
#: Whether this worker's task channel runs reliable fetch: shared memory made by the worker
#: step before the pool forks, set by the consumer's fetch step, read by the pool processes.
_fetching: Any = None
#: Presence clients of this process. A forked pool process closes its copies of their
#: sockets, so that only the worker's main process holds its named connection open.
_presence_clients: weakref.WeakSet[redis.Redis] = weakref.WeakSet()


def _close_inherited_presence() -> None:
    # Runs in a freshly forked pool process. Only close this process's copy of the socket
    # (the parent's connection stays open): no redis-py call, which could wait forever on
    # a lock that another thread of the parent (the heartbeat) held at the fork.
    for client in list(_presence_clients):
        sock = getattr(client.connection, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


os.register_at_fork(after_in_child=_close_inherited_presence)


def presence_name(key_prefix: str, worker_id: str) -> str:
    """The client name (``CLIENT SETNAME``) of ``worker_id``'s presence connection."""
    return f"{key_prefix}:worker:{worker_id}"


def record_key(key_prefix: str, worker_id: str) -> str:
    """The fetch record of ``worker_id`` (a broker key, before kombu's global prefix; see
    :mod:`celery_reliable.orphans.fetch`)."""
    return f"{key_prefix}:fetch:{worker_id}"


def new_worker_id(hostname: str | None = None, pid: int | None = None) -> str:
    """A fresh, unique worker id: ``<host>:<pid>:<8 random hex digits>``."""
    host = (hostname or socket.gethostname()).replace("{", "").replace("}", "")
    return f"{host}:{pid or os.getpid()}:{secrets.token_hex(4)}"


def current_worker_id() -> str | None:
    """The id of the worker this process belongs to (MainProcess or pool child), if any."""
    return _current_worker_id


def current_heartbeat() -> Heartbeat | None:
    """The heartbeat of the worker whose MainProcess this is, if any."""
    return _current_heartbeat


def set_current(worker_id: str, heartbeat: Heartbeat | None) -> None:
    """Record this worker's id (inherited by pool processes) and heartbeat."""
    global _current_worker_id, _current_heartbeat, _fetching
    _current_worker_id = worker_id
    _current_heartbeat = heartbeat
    if _fetching is None:  # before the pool forks: the pool processes share it
        _fetching = RawValue(ctypes.c_bool, False)


def set_fetching(on: bool) -> None:
    """Say whether this worker's task channel runs reliable fetch (its MainProcess)."""
    if _fetching is not None:
        _fetching.value = on


def worker_fetches() -> bool:
    """Whether the worker this process belongs to receives with reliable fetch: then its
    fetch record is the in-flight record and the ledger is not written."""
    return bool(_fetching is not None and _fetching.value)


@dataclass(frozen=True)
class RegistryKeys:
    """Names of the registry's keys under one store's prefix (all in one hash slot)."""

    store: RedisStore

    def _k(self, *parts: str) -> str:
        return self.store.key("{reaper}", *parts)

    @property
    def workers(self) -> str:
        return self._k("workers")

    @property
    def info(self) -> str:
        return self._k("info")

    @property
    def claims(self) -> str:
        return self._k("claims")

    @property
    def stats(self) -> str:
        return self._k("stats")

    @property
    def last_pass(self) -> str:
        return self._k("last_pass")

    @property
    def epoch(self) -> str:
        return self._k("epoch")

    def ledger(self, worker_id: str) -> str:
        return self._k("ledger", worker_id)

    def held(self, worker_id: str) -> str:
        return self._k("held", worker_id)

    def reaped(self, worker_id: str) -> str:
        return self._k("reaped", worker_id)

    def claimed_ledger(self, worker_id: str) -> str:
        return self._k("claimed", "ledger", worker_id)

    def claimed_held(self, worker_id: str) -> str:
        return self._k("claimed", "held", worker_id)

    def recoveries(self, task_id: str) -> str:
        return self._k("rec", task_id)


class WorkerRegistry:
    """One worker's registration: heartbeat and deregistration (one round trip each).

    Parameters:
      app: the worker's Celery app.
      worker_id: its unique id (:func:`new_worker_id`).
      node: the Celery node name (``w1@host``), shown by ``celery reliable status``.

    Examples:
        >>> reg = WorkerRegistry(app, new_worker_id(), "w1@host")
        >>> reg.heartbeat(held_tags=["6c1e..."])
        False
        >>> reg.deregister()
    """

    def __init__(self, app: Any, worker_id: str, node: str) -> None:
        self.app = app
        self.worker_id = worker_id
        self.node = node
        self.store = store_for(app)
        self.keys = RegistryKeys(self.store)
        self.started_at = time.time()
        self.presence_name = presence_name(self.store.prefix, worker_id)
        self._presence: redis.Redis | None = None

    @property
    def presence(self) -> redis.Redis | None:
        """The worker's own store connection, named :attr:`presence_name`. The kernel
        closes it when the main process dies, however it dies, and a reaper sees that in
        ``CLIENT LIST`` at once. Heartbeats and deregistration go through it, so it never
        sits idle long enough for a server ``timeout`` to close it. None on a Redis
        Cluster store (connections are per node: the heartbeat timeout alone judges)."""
        if self._presence is None:
            if parse_store_url(self.store.settings.redis_url).kind == "cluster":
                return None
            client = make_client(
                self.store.settings.redis_url,
                self.store.settings.redis_sentinel_master,
                client_name=self.presence_name,
                single_connection_client=True,
            )
            _presence_clients.add(client)
            self._presence = client
        return self._presence

    def info_json(self) -> str:
        return json.dumps(
            {
                "node": self.node,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": self.started_at,
                "presence": self.presence_name if self.presence is not None else None,
            },
            sort_keys=True,
        )

    def heartbeat(
        self, held_tags: list[str] | None = None, started: set[str] | frozenset[str] = frozenset()
    ) -> bool:
        """Refresh the registration (and the held delivery tags, when given; those in
        ``started`` were handed to the pool, the others wait in the worker).

        Returns True when a reaper had declared this worker dead since the last beat.
        """
        k = self.keys
        replace = "1" if held_tags is not None else "0"
        reported = [STARTED_MARK + t if t in started else t for t in held_tags or ()]
        reply = self.store.script(HEARTBEAT)(
            keys=[
                k.workers,
                k.info,
                k.held(self.worker_id),
                k.reaped(self.worker_id),
                k.epoch,
            ],
            args=[self.worker_id, self.info_json(), repr(time.time()), replace, *reported],
            client=self.presence,
        )
        return bool(int(reply[0]))

    def deregister(self) -> int:
        """Remove the registration; returns how many ledger entries were still there."""
        k = self.keys
        wid = self.worker_id
        return int(
            self.store.script(DEREGISTER)(
                keys=[k.workers, k.info, k.ledger(wid), k.held(wid)],
                args=[wid],
                client=self.presence,
            )
        )


def check_store(store: RedisStore) -> None:
    """At worker start: stop with one line naming ``reliable_redis_url`` when the store
    answers but cannot serve (a wrong password, not Redis). Unreachable is not an error
    here: :meth:`Heartbeat.register` waits for it.

    Raises:
        ConfigurationError: the store is unusable; the message names the setting.
    """
    try:
        store.client.ping()
    except redis.RedisError as exc:
        check_store_answer(store, exc)


def check_store_answer(store: RedisStore, exc: BaseException) -> None:
    """Raise ConfigurationError when ``exc`` says the store is unusable (see
    :func:`store_problem`); return for errors that waiting may cure."""
    problem = store_problem(exc)
    if problem is not None:
        url = maybe_sanitize_url(store.settings.redis_url)
        raise ConfigurationError("reliable_redis_url", f"{url}: {problem}") from None


def store_problem(exc: BaseException) -> str | None:
    """Why the store is unusable, when ``exc`` says so (a wrong password, a server that
    does not speak Redis); None for errors that waiting may cure (unreachable, loading)."""
    if isinstance(exc, redis.AuthenticationError):
        return f"the store refused the credentials ({exc})"
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return f"the server there does not answer as Redis ({exc})"
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(
        ("NOAUTH", "WRONGPASS", "NOPERM")
    ):
        return f"the store refused the credentials ({exc})"
    return None


def held_delivery_tags(started: set[str] | None = None) -> list[str]:
    """Delivery tags of the requests this worker holds (prefetched, ETA-waiting, running);
    the tags of those already handed to the pool are added to ``started`` when given."""
    from celery.worker import state

    for _ in range(SNAPSHOT_ATTEMPTS):
        try:
            requests = [*state.reserved_requests, *compat.scheduled_requests()]
            break
        except RuntimeError:  # the event loop changed the set while we copied it
            continue
    else:
        return []
    tags = set()
    for req in requests:
        message = getattr(req, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None and not req.acknowledged:
            tags.add(str(tag))
            if started is not None and compat.sent_to_pool(req):
                started.add(str(tag))
    return sorted(tags)


class Heartbeat:
    """The heartbeat thread of one worker's MainProcess.

    Parameters:
      registry: the worker's registration.
      interval: seconds between beats (``reliable_heartbeat_interval``).
      timeout: ``reliable_worker_timeout`` (silent this long, the worker may be reaped).
      report_tags: report held delivery tags (only meaningful on the Redis broker).
      companions: services started and stopped with the heartbeat (the embedded reaper).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        interval: float,
        timeout: float,
        report_tags: bool,
        companions: list[Any] | None = None,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self.report_tags = report_tags
        self.companions = list(companions or [])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._deregistered = False
        #: Delivery tags a reaper gave back while this worker was declared dead.
        self._surrendered: set[str] = set()
        #: Broker QoS objects whose unacknowledged tags are surrendered on a reap.
        self._qos: list[Any] = []
        self._beaten = threading.Condition()
        self._beats = 0
        self._last_ok = time.monotonic()
        self._stale_waited = False
        #: Held tags of the last report that had been handed to the pool.
        self._started: set[str] = set()

    def start(self) -> None:
        self.register()
        self._thread = threading.Thread(target=self._run, name="reliable-heartbeat", daemon=True)
        self._thread.start()
        for companion in self.companions:
            companion.start()

    def register(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """The first heartbeat, retried with backoff until the store answers.

        Called from the worker step before the consumer starts, so a worker whose store is
        unreachable does not consume (a reaper could not see it, and would give its
        messages back). Each failed attempt logs how long the worker has been waiting.

        Raises:
            ConfigurationError: the store answers, but not as a usable Redis (a wrong
                password, not Redis at all): waiting would not help.
        """
        began = time.monotonic()
        pause = REGISTER_BACKOFF
        while True:
            try:
                self.registry.heartbeat(self._held() if self.report_tags else None, self._started)
            except redis.RedisError as exc:
                check_store_answer(self.registry.store, exc)
                logger.error(
                    "celery_reliable: worker %s cannot register: store %s unreachable for %.0fs"
                    " (%r); not consuming until it answers, next try in %.1fs",
                    self.registry.worker_id,
                    maybe_sanitize_url(self.registry.store.settings.redis_url),
                    time.monotonic() - began,
                    exc,
                    pause,
                )
                sleep(pause)
                pause = min(pause * 2, REGISTER_BACKOFF_MAX)
                continue
            self._last_ok = time.monotonic()
            self._notify()
            if time.monotonic() - began > pause:
                logger.warning(
                    "celery_reliable: worker %s registered after %.0fs; consuming",
                    self.registry.worker_id,
                    time.monotonic() - began,
                )
            return

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def _held(self) -> list[str]:
        # The requests Celery tracks, plus every message still unacknowledged on the task
        # channel (that also covers requests parked in Celery's own rate-limit buckets).
        self._started = set()
        tags = sorted(set(held_delivery_tags(self._started)) | self._unacked_tags())
        return [t for t in tags if t not in self._surrendered] if self._surrendered else tags

    def watch_qos(self, qos: Any) -> None:
        """Surrender the tags unacknowledged on ``qos`` (the current task channel's) when
        a reap is noticed."""
        self._qos = [qos]

    def _unacked_tags(self) -> set[str]:
        tags: set[str] = set()
        for qos in self._qos:
            for _ in range(SNAPSHOT_ATTEMPTS):
                try:
                    tags.update(str(t) for t in compat.delivered_tags(qos))
                    break
                except RuntimeError:  # changed while copied
                    continue
        return tags

    def reclaim(self, tag: str) -> None:
        """``tag`` was delivered to this worker again: its ack is ours to send again."""
        if self._surrendered:
            self._surrendered.discard(tag)

    def all_clear(self) -> bool:
        """True while nothing was surrendered and the last beat is fresh: then no tag can
        be surrendered, and an ack needs no other check (one clock read)."""
        return not self._surrendered and time.monotonic() - self._last_ok <= self.timeout

    def surrendered(self, tag: str, wait: float) -> bool:
        """Whether a reaper gave ``tag``'s message back (so it must not be acked).

        Cheap while heartbeats succeed. After a silence longer than the worker timeout the
        first caller waits up to ``wait`` seconds for the next beat to find out.
        """
        if tag in self._surrendered:
            return True
        if time.monotonic() - self._last_ok <= self.timeout or self._stale_waited:
            return False
        self._stale_waited = True
        with self._beaten:
            seen = self._beats
            self._beaten.wait_for(lambda: self._beats != seen, timeout=wait)
        return tag in self._surrendered

    def beat(self) -> None:
        reg = self.registry
        try:
            tags = self._held() if self.report_tags else None
            was_reaped = reg.heartbeat(tags, self._started)
            if was_reaped:
                # The reaper gave these messages back; another worker may hold them by now
                # (same delivery tags). Never ack or report them again, so that neither our
                # late ack nor, if this worker really dies later, a second restore touches
                # the other worker's copy.
                self._surrendered.update(tags or ())
                self._surrendered.update(self._unacked_tags())
                if tags:
                    reg.heartbeat(self._held(), self._started)
        except redis.RedisError as exc:
            if not self._failing:
                logger.error(
                    "celery_reliable: heartbeat of worker %s failed (%r); retrying every %.1fs."
                    " Past reliable_worker_timeout a reaper will recover its tasks.",
                    reg.worker_id,
                    exc,
                    self.interval,
                )
            self._failing = True
            instruments.set_registered(False)
            instruments.store_error("heartbeat")
            self._notify()
            return
        self._last_ok = time.monotonic()
        instruments.set_registered(True)
        self._stale_waited = False
        self._notify()
        if self._failing:
            logger.warning("celery_reliable: heartbeat of worker %s is back", reg.worker_id)
            self._failing = False
        if was_reaped:
            logger.error(
                "celery_reliable: worker %s (%s) was declared DEAD by a reaper (no heartbeat "
                "for longer than reliable_worker_timeout: paused, partitioned or overloaded). "
                "Its in-flight and prefetched tasks were given back to the broker and may run "
                "twice; their acknowledgements will not be sent. Registered again under the "
                "same id.",
                reg.worker_id,
                reg.node,
            )

    def _notify(self) -> None:
        with self._beaten:
            self._beats += 1
            self._beaten.notify_all()

    def stop(self) -> None:
        """Warm stop: keep beating until the pool is done (see RegistryStep)."""

    def shutdown(self) -> None:
        """Stop beating and deregister (once)."""
        self._stop.set()
        for companion in self.companions:
            companion.stop()
        self.companions = []
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1)
        if self._deregistered:
            return
        self._deregistered = True
        instruments.set_registered(False)
        try:
            left = self.registry.deregister()
        except redis.RedisError as exc:
            logger.error(
                "celery_reliable: could not deregister worker %s (%r); a reaper will remove it"
                " after reliable_worker_timeout",
                self.registry.worker_id,
                exc,
            )
            return
        logger.info(
            "celery_reliable: worker %s deregistered (%d ledger entries left)",
            self.registry.worker_id,
            left,
        )

    def terminate(self) -> None:
        """Cold stop: running tasks are cancelled and their messages restored by the
        broker connection's close, so deregister right away."""
        self.shutdown()


def live_workers(app: Any) -> list[dict[str, Any]]:
    """Registered workers, oldest heartbeat first: node, id, heartbeat age, in-flight."""
    store = store_for(app)
    k = RegistryKeys(store)
    client: Any = store.client
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    rows = client.zrange(k.workers, 0, -1, withscores=True)
    if not rows:
        return []
    pipe = client.pipeline(transaction=False)
    pipe.hmget(k.info, [wid for wid, _ in rows])
    for wid, _ in rows:
        pipe.hlen(k.ledger(wid))
        pipe.hlen(k.held(wid))
    replies = pipe.execute()
    infos, counts = replies[0], replies[1:]
    records = _record_sizes(app, [wid for wid, _ in rows])
    timeout = settings_of(app).worker_timeout
    out = []
    for i, (wid, score) in enumerate(rows):
        info = json.loads(infos[i]) if infos[i] else {}
        age = max(0.0, now - float(score))
        out.append(
            {
                "node": info.get("node"),
                "id": wid,
                "heartbeat_age": round(age, 2),
                "alive": age <= timeout,
                "in_flight": max(int(counts[2 * i]), records[i]),
                "held": int(counts[2 * i + 1]),
            }
        )
    return out


def _record_sizes(app: Any, worker_ids: list[str]) -> list[int]:
    """How many messages each worker's fetch record holds (0 off the Redis broker).

    On the Redis broker with reliable fetch the record is the in-flight record (received
    and not acknowledged; the ledger only has the redelivered ReliableTasks, which are in
    the record too), so a worker's in-flight count is the larger of the two."""
    if not worker_ids or not broker_is_redis(app):
        return [0] * len(worker_ids)
    prefix = settings_of(app).key_prefix
    try:
        with app.pool.acquire(block=True, timeout=BROKER_READ_TIMEOUT) as conn:
            # one attempt, not the app's connection retry policy: a status must not hang
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_READ_TIMEOUT)
            with conn.default_channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                for wid in worker_ids:
                    pipe.hlen(record_key(prefix, wid))  # kombu adds its global_keyprefix
                return [int(n or 0) for n in pipe.execute()]
    except (OSError, redis.RedisError, KombuError) as exc:
        logger.warning(
            "celery_reliable: could not read the fetch records on the broker (%r); in-flight"
            " counts show only the ledgers' redelivered tasks",
            exc,
        )
        return [0] * len(worker_ids)


def reaper_stats(app: Any) -> dict[str, int]:
    """Counters kept by reapers and ledgers (recovered, dead_lettered, duplicates...)."""
    store = store_for(app)
    raw: dict[str, str] = store.client.hgetall(RegistryKeys(store).stats)  # type: ignore[assignment]
    return {name: int(value) for name, value in sorted(raw.items())}
