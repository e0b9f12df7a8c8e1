"""The one Redis access layer: client, key names and Lua scripts.

Every module talks to Redis through :class:`RedisStore`. It builds the client from
``reliable_redis_url`` (``redis://``, ``rediss://`` with TLS, passwords in the URL), names
keys under ``reliable_key_prefix`` and loads the Lua scripts that live as ``.lua`` files
beside the module that uses them (:class:`Lua`). Scripts run through EVALSHA and are
re-loaded transparently when Redis answers NOSCRIPT (after a restart or ``SCRIPT FLUSH``).

Keys that one script touches together share a ``{hash tag}`` so scripts also run on Redis
Cluster: ``<prefix>:{dlq}:index``, ``<prefix>:{dlq}:entries``...
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
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ..core.config import Settings
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


def make_client(url: str) -> redis.Redis:
    """A redis-py client for ``url`` that retries transient connection errors."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=SOCKET_CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(
            ExponentialWithJitterBackoff(cap=RETRY_BACKOFF_CAP, base=RETRY_BACKOFF_BASE),
            CONNECTION_RETRIES,
        ),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


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

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self._client = client
        self._scripts: dict[Lua, Script] = {}
        self._lock = threading.Lock()

    @cached_property
    def client(self) -> redis.Redis:
        """The redis-py client (fork-safe: redis-py resets its pool in a forked child)."""
        return self._client if self._client is not None else make_client(self.settings.redis_url)

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
