"""Settings: one typed, validated object built from ``app.conf``.

Every setting is ``reliable_<name>`` in ``app.conf`` and may be overridden from the
environment as ``CELERY_RELIABLE_<NAME>`` (the environment wins, so an operator can change
a deployed value without a code change). Invalid values raise
:class:`~celery_reliable.errors.ConfigurationError` naming the setting.

Examples:
    >>> app.conf.reliable_drain_timeout = 40
    >>> Settings.from_app(app).drain_timeout
    40.0
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigurationError

#: Coordination store used when the broker is not Redis and no URL is configured.
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Every key the package writes starts with this.
DEFAULT_KEY_PREFIX = "reliable"
#: Seconds between worker heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 2.0
#: A worker whose last heartbeat is older than this many seconds is dead.
DEFAULT_WORKER_TIMEOUT = 10.0
#: Seconds between reaper passes.
DEFAULT_REAPER_INTERVAL = 2.0
#: A task orphaned this many times is dead-lettered with reason ``orphaned``.
DEFAULT_MAX_RECOVERIES = 3
#: Seconds running tasks get after SIGTERM before they are requeued.
DEFAULT_DRAIN_TIMEOUT = 25.0
#: Oldest dead letters are dropped (and counted) past this many entries.
DEFAULT_DEAD_LETTER_MAX = 100_000
#: Dead letters older than this many seconds are dropped (and counted): 30 days.
DEFAULT_DEAD_LETTER_TTL = 30 * 24 * 3600.0
#: Publishes whose serialized body is larger than this raise PayloadTooLarge.
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
#: Seconds an ordering key waits for a sequence number that was taken but never
#: published (a producer crashed between the two) before skipping it.
DEFAULT_ORDERING_GAP_TIMEOUT = 30.0
#: When Redis cannot be reached at task start, rate limits and breakers let the task
#: run (True, fail open) or defer it until Redis answers (False, fail closed).
DEFAULT_FAIL_OPEN = True

ENV_PREFIX = "CELERY_RELIABLE_"
CONF_PREFIX = "reliable_"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """All ``reliable_*`` settings of one app, typed and validated.

    Parameters:
      redis_url: coordination store (``redis://``, ``rediss://`` for TLS, ``unix://``).
      key_prefix: prefix of every key written.
      heartbeat_interval: seconds between worker heartbeats.
      worker_timeout: a worker silent for longer is dead.
      reaper_interval: seconds between reaper passes.
      max_recoveries: orphaned this many times, a task is dead-lettered.
      drain_timeout: seconds running tasks get after SIGTERM.
      dead_letter_max: capacity of the dead-letter store.
      dead_letter_ttl: retention of dead letters, in seconds.
      max_payload_bytes: largest serialized publish accepted.
      metrics_port: when set, workers serve Prometheus metrics on this port.
      reaper_metrics_port: when set, the reaper serves its cluster-wide metrics here.
      ordering_gap_timeout: seconds before a never-published sequence number is skipped.
      embedded_reaper: run the reaper inside workers too (leader-elected).
      fail_open: rate limits and breakers let tasks run while Redis is unreachable.
    """

    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = DEFAULT_KEY_PREFIX
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    reaper_interval: float = DEFAULT_REAPER_INTERVAL
    max_recoveries: int = DEFAULT_MAX_RECOVERIES
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    dead_letter_max: int = DEFAULT_DEAD_LETTER_MAX
    dead_letter_ttl: float = DEFAULT_DEAD_LETTER_TTL
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    metrics_port: int | None = None
    reaper_metrics_port: int | None = None
    ordering_gap_timeout: float = DEFAULT_ORDERING_GAP_TIMEOUT
    embedded_reaper: bool = False
    fail_open: bool = DEFAULT_FAIL_OPEN

    @classmethod
    def from_app(cls, app: Any, environ: Mapping[str, str] | None = None) -> Settings:
        """Read, convert and validate every setting of ``app``.

        Raises:
            ConfigurationError: naming the first invalid setting.
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        for name in sorted(str(k) for k in app.conf if str(k).startswith(CONF_PREFIX)):
            if name[len(CONF_PREFIX) :] not in known:
                raise ConfigurationError(name, f"unknown setting (a typo?){_hint(name, known)}")
        for name in sorted(k for k in env if k.startswith(ENV_PREFIX)):
            if name[len(ENV_PREFIX) :].lower() not in known:
                setting = CONF_PREFIX + name[len(ENV_PREFIX) :].lower()
                raise ConfigurationError(
                    setting,
                    f"unknown setting in environment variable {name} (a typo?)"
                    + _hint(setting, known),
                )
        values: dict[str, Any] = {}
        for f in fields(cls):
            conf_name = CONF_PREFIX + f.name
            env_name = ENV_PREFIX + f.name.upper()
            from_env = env.get(env_name, "") != ""
            raw = env[env_name] if from_env else app.conf.get(conf_name)
            if raw is None:
                if f.name == "redis_url":
                    values[f.name] = default_redis_url(app)
                continue
            try:
                values[f.name] = _CONVERTERS[f.name](conf_name, raw)
            except ConfigurationError as exc:
                if not from_env:
                    raise
                raise ConfigurationError(
                    conf_name, f"{exc.problem} (from environment variable {env_name})"
                ) from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check cross-field rules; raise ConfigurationError naming the setting."""
        if self.worker_timeout <= self.heartbeat_interval:
            raise ConfigurationError(
                "reliable_worker_timeout",
                f"must be greater than reliable_heartbeat_interval "
                f"({self.worker_timeout} <= {self.heartbeat_interval}); "
                "otherwise live workers would be declared dead",
            )


def _hint(name: str, known: set[str]) -> str:
    """``; did you mean reliable_x?`` for the closest known setting, if one is close."""
    close = difflib.get_close_matches(name[len(CONF_PREFIX) :], sorted(known), n=1)
    return f"; did you mean {CONF_PREFIX}{close[0]}?" if close else ""


def default_redis_url(app: Any) -> str:
    """The broker URL when it is a Redis URL, else :data:`DEFAULT_REDIS_URL`."""
    broker = app.conf.broker_url
    if isinstance(broker, str) and urlparse(broker.split(";")[0]).scheme in _REDIS_SCHEMES:
        return broker.split(";")[0]
    return DEFAULT_REDIS_URL


# --- converters: (source name, raw value) -> typed value, raising ConfigurationError ---


def _number(kind: type, minimum: float, exclusive: bool) -> Callable[[str, Any], Any]:
    def convert(source: str, raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ConfigurationError(source, f"expected a number, got {raw!r}")
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise ConfigurationError(source, f"expected a number, got {raw!r}") from None
        if kind is int and isinstance(raw, float) and raw != value:
            raise ConfigurationError(source, f"expected a whole number, got {raw!r}")
        if value < minimum or (exclusive and value == minimum):
            op = ">" if exclusive else ">="
            raise ConfigurationError(source, f"must be {op} {minimum}, got {raw!r}")
        return value

    return convert


def _positive_float(source: str, raw: Any) -> float:
    return float(_number(float, 0, exclusive=True)(source, raw))


def _positive_int(source: str, raw: Any) -> int:
    return int(_number(int, 1, exclusive=False)(source, raw))


def _non_negative_int(source: str, raw: Any) -> int:
    return int(_number(int, 0, exclusive=False)(source, raw))


def _port(source: str, raw: Any) -> int:
    value = int(_number(int, 0, exclusive=False)(source, raw))
    if value > 65535:
        raise ConfigurationError(source, f"must be a TCP port (0-65535), got {raw!r}")
    return value


def _bool(source: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(source, f"expected true or false, got {raw!r}")


def _redis_url(source: str, raw: Any) -> str:
    if not isinstance(raw, str) or urlparse(raw).scheme not in _REDIS_SCHEMES:
        raise ConfigurationError(
            source, f"expected a redis://, rediss:// or unix:// URL, got {raw!r}"
        )
    return raw


def _key_prefix(source: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw or any(c in raw for c in "{} \t\n"):
        raise ConfigurationError(
            source, f"expected a non-empty string without braces or spaces, got {raw!r}"
        )
    return raw


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "redis_url": _redis_url,
    "key_prefix": _key_prefix,
    "heartbeat_interval": _positive_float,
    "worker_timeout": _positive_float,
    "reaper_interval": _positive_float,
    "max_recoveries": _non_negative_int,
    "drain_timeout": _positive_float,
    "dead_letter_max": _positive_int,
    "dead_letter_ttl": _positive_float,
    "max_payload_bytes": _positive_int,
    "metrics_port": _port,
    "reaper_metrics_port": _port,
    "ordering_gap_timeout": _positive_float,
    "embedded_reaper": _bool,
    "fail_open": _bool,
}
