"""The one Redis access layer: client, key names and Lua scripts.

Every module talks to Redis through :class:`RedisStore`. It builds the client from
``reliable_redis_url`` (:func:`make_client`): one server (``redis://``, ``rediss://`` with
TLS, ``unix://``), Redis Cluster (``redis+cluster://``, ``rediss+cluster://``) or the master
that Sentinel names (``sentinel://`` with ``reliable_redis_sentinel_master``). It names
keys under ``reliable_key_prefix`` and loads the Lua scripts that live as ``.lua`` files
beside the module that uses them (:class:`Lua`). Scripts run through EVALSHA and are
re-loaded transparently when Redis answers NOSCRIPT (after a restart, a failover or
``SCRIPT FLUSH``).

Keys that one script touches together share a ``{hash tag}`` so every script runs on Redis
Cluster: ``<prefix>:{dlq}:index``, ``<prefix>:{dlq}:entries``... Several scripts sent in
one round trip go through :class:`ScriptPipeline`, which works on a cluster too (redis-py
refuses scripts in a cluster pipeline; this one sends plain EVALSHA commands).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import redis
from redis.backoff import FullJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..core.config import Settings, parse_store_url, sanitized_url
from .state import settings_of

logger = logging.getLogger(__name__)

#: Seconds to wait for a TCP connect to Redis.
SOCKET_CONNECT_TIMEOUT = 2.0
#: Seconds to wait for a Redis reply.
SOCKET_TIMEOUT = 5.0
#: Connection-level retries of one command before the error reaches the caller.
CONNECTION_RETRIES = 3
#: Backoff between those retries: base and cap, in seconds.
RETRY_BACKOFF_BASE = 0.05
RETRY_BACKOFF_CAP = 1.0
#: Seconds between PINGs on an idle pooled connection (detects a restarted server).
HEALTH_CHECK_INTERVAL = 10


def _retry() -> Retry:
    return Retry(
        FullJitterBackoff(cap=RETRY_BACKOFF_CAP, base=RETRY_BACKOFF_BASE),
        CONNECTION_RETRIES,
    )


def _connection_options() -> dict[str, Any]:
    """Options every connection of the store gets: timeouts, retries, decoded replies."""
    return {
        "decode_responses": True,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": _retry(),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


class ClusterClient(RedisCluster):
    """redis-py's RedisCluster whose own errors are :class:`redis.RedisError` too.

    RedisCluster raises ``RedisClusterException`` (not a RedisError) when no node answers
    or a slot is not covered; every caller of the store catches RedisError to survive
    outages, so those are re-raised as :class:`redis.exceptions.ClusterError`.
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterError(str(exc)) from exc


#: Errors a store call may raise when Redis is unreachable or misbehaves: catch these.
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


def make_client(url: str, sentinel_master: str | None = None, **extra: Any) -> Any:
    """A redis-py client for ``url`` that retries transient connection errors.

    ``redis://``, ``rediss://`` and ``unix://`` give a ``redis.Redis``;
    ``redis+cluster://`` and ``rediss+cluster://`` a RedisCluster (:class:`ClusterClient`);
    ``sentinel://`` a ``redis.Redis`` bound to the current master of ``sentinel_master``,
    which follows a failover. ``extra`` goes to redis-py for a standalone store
    (``client_name``, ``single_connection_client``) and is ignored for the others.

    Raises:
        redis.ConnectionError: a cluster whose seed nodes do not answer.
    """
    address = parse_store_url(url)
    options = _connection_options()
    if address.kind == "standalone":
        return redis.Redis.from_url(url, **options, **extra)
    auth: dict[str, Any] = {"username": address.username, "password": address.password}
    if address.kind == "cluster":
        # RedisCluster retries connection errors itself (after refreshing its slot map)
        options.pop("retry_on_error")
        try:
            return ClusterClient(
                startup_nodes=[ClusterNode(h, p) for h, p in address.nodes],
                ssl=address.ssl,
                **auth,
                **options,
            )
        except RedisClusterException as exc:
            raise redis.ConnectionError(str(exc)) from exc
    if not sentinel_master:
        raise ValueError(f"{sanitized_url(url)}: a sentinel:// store needs a master name")
    sentinel = Sentinel(
        list(address.nodes),
        sentinel_kwargs={
            "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
            "socket_timeout": SOCKET_CONNECT_TIMEOUT,
        },
    )
    return sentinel.master_for(sentinel_master, db=address.db, **auth, **options)


@dataclass(frozen=True)
class Lua:
    """A Lua script that lives as ``<name>.lua`` beside the module that uses it.

    Parameters:
      package: the package holding the file (pass ``__package__``).
      name: the file name without ``.lua``.

    Examples:
        >>> DLQ_ADD = Lua(__package__, "dlq_add")
        >>> store.run(DLQ_ADD, keys=[...], args=[...])
    """

    package: str
    name: str

    def source(self) -> str:
        """The script's text."""
        path = resources.files(self.package).joinpath(f"{self.name}.lua")
        return path.read_text(encoding="utf-8")


class RedisStore:
    """Client, keys and scripts for one app's coordination store.

    Parameters:
      settings: the app's validated settings.
      client: an existing client to use instead of one built from ``settings.redis_url``.

    Examples:
        >>> store = RedisStore(Settings(redis_url="redis://localhost:6379/1"))
        >>> store.key("{dlq}", "index")
        'reliable:{dlq}:index'
        >>> store.run(DLQ_ADD, keys=[...], args=[...])
    """

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self._client = client
        self._scripts: dict[Lua, Script] = {}
        self._lock = threading.Lock()

    @cached_property
    def client(self) -> redis.Redis:
        """The redis-py client (fork-safe: redis-py resets its pool in a forked child).

        A ``redis.Redis``, or a RedisCluster for a cluster URL (the same commands; typed
        as ``redis.Redis`` for the callers' sake).
        """
        if self._client is not None:
            return self._client  # type: ignore[no-any-return]
        settings = self.settings
        return make_client(settings.redis_url, settings.redis_sentinel_master)  # type: ignore[no-any-return]

    @property
    def is_cluster(self) -> bool:
        """True when the store is a Redis Cluster."""
        return isinstance(self.client, RedisCluster)

    def key(self, *parts: str) -> str:
        """``<prefix>:<part>:<part>...``; put ``{tag}`` parts where scripts need a slot."""
        return ":".join((self.prefix, *parts))

    def script(self, lua: Lua) -> Script:
        """The Lua script ``lua``, registered once per store.

        Calling the returned object runs EVALSHA and falls back to SCRIPT LOAD on
        NOSCRIPT, so a Redis restart or ``SCRIPT FLUSH`` is survived.
        """
        script = self._scripts.get(lua)
        if script is None:
            with self._lock:
                script = self._scripts.get(lua)
                if script is None:
                    script = self.client.register_script(lua.source())
                    self._scripts[lua] = script
        return script

    def run(self, lua: Lua, keys: list[str], args: list[Any]) -> Any:
        """Run script ``lua`` with ``keys`` and ``args``; return its reply."""
        return self.script(lua)(keys=keys, args=args)

    def pipeline(self) -> ScriptPipeline:
        """Scripts and commands sent together (see :class:`ScriptPipeline`)."""
        return ScriptPipeline(self)


class ScriptPipeline:
    """Scripts and plain commands sent in one round trip (one per node on a cluster).

    redis-py's cluster pipeline refuses scripts; this one queues a plain EVALSHA there,
    and runs a script again on its own when a node answers NOSCRIPT (a node that never
    ran it, or restarted). Replies come back in the order the calls were queued; the
    first error is raised after the whole batch ran.

    Parameters:
      store: the store whose client and scripts are used.

    Examples:
        >>> batch = store.pipeline()
        >>> batch.run(ORD_START, keys, args)
        >>> batch.command("zadd", index, {member: score})
        >>> start_reply, _ = batch.execute()
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.cluster = store.is_cluster
        self._pipe: Any = store.client.pipeline(transaction=False)
        self._calls: list[tuple[Lua, list[str], list[Any]] | None] = []

    def run(self, lua: Lua, keys: list[str], args: list[Any]) -> None:
        """Queue script ``lua``."""
        script = self.store.script(lua)
        if self.cluster:
            self._pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        else:
            script(keys=keys, args=args, client=self._pipe)
        self._calls.append((lua, keys, args))

    def command(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Queue one plain command (``command("zadd", key, {member: score})``)."""
        getattr(self._pipe, name)(*args, **kwargs)
        self._calls.append(None)

    def execute(self) -> list[Any]:
        """Send everything queued; the replies, in order."""
        if not self._calls:
            return []
        if not self.cluster:
            return list(self._pipe.execute())
        replies = list(self._pipe.execute(raise_on_error=False))
        for i, (call, reply) in enumerate(zip(self._calls, replies, strict=True)):
            if call is not None and isinstance(reply, NoScriptError):
                replies[i] = self.store.run(*call)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


_stores: dict[tuple[int, int], RedisStore] = {}
_stores_lock = threading.Lock()


def store_for(app: Any) -> RedisStore:
    """The store of ``app`` in this process (one per app and pid)."""
    key = (id(app), os.getpid())
    store = _stores.get(key)
    if store is None:
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = RedisStore(settings_of(app))
                _stores[key] = store
    return store
