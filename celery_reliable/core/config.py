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
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import unquote

from kombu.utils.url import maybe_sanitize_url

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
#: On the Redis broker, workers pop each message and record it as theirs in one step
#: (reliable fetch), so a kill -9 can never lose a message being received.
DEFAULT_FETCH = True
#: Address the metrics and health server of a worker (and of the reaper) listens on:
#: every interface, so Prometheus and the orchestrator's probes can reach it.
DEFAULT_METRICS_ADDRESS = "0.0.0.0"

#: Largest duration any setting accepts, in seconds (ten years): larger values (``1e308``,
#: ``inf``) overflow the timestamps and Redis expiries computed from them.
MAX_SECONDS = 10 * 365 * 24 * 3600.0
#: Largest count or size any setting accepts.
MAX_WHOLE_NUMBER = 2**31 - 1

ENV_PREFIX = "CELERY_RELIABLE_"
CONF_PREFIX = "reliable_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: One label of a host name (RFC 1123).
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Settings:
    """All ``reliable_*`` settings of one app, typed and validated.

    Parameters:
      redis_url: coordination store: ``redis://``, ``rediss://`` (TLS), ``unix://``,
        ``redis+cluster://`` / ``rediss+cluster://`` (Redis Cluster) or ``sentinel://``.
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
      metrics_address: the address both metrics servers listen on (an IPv4 or IPv6
        address, or a host name).
      ordering_gap_timeout: seconds before a never-published sequence number is skipped.
      embedded_reaper: run the reaper inside workers too (leader-elected).
      fail_open: rate limits and breakers let tasks run while Redis is unreachable.
      redis_sentinel_master: the master's name when ``redis_url`` is ``sentinel://``.
      fetch: reliable fetch on the Redis broker (pop and record in one step).
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
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    ordering_gap_timeout: float = DEFAULT_ORDERING_GAP_TIMEOUT
    embedded_reaper: bool = False
    fail_open: bool = DEFAULT_FAIL_OPEN
    redis_sentinel_master: str | None = None
    fetch: bool = DEFAULT_FETCH

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
                continue
            try:
                values[f.name] = _CONVERTERS[f.name](conf_name, raw)
            except ConfigurationError as exc:
                if not from_env:
                    raise
                raise ConfigurationError(
                    conf_name, f"{exc.problem} (from environment variable {env_name})"
                ) from None
        if "redis_url" not in values:
            given = values.get("redis_sentinel_master")
            values["redis_url"], master = store_url_from_broker(app, given)
            if master is not None and given is None:
                values["redis_sentinel_master"] = master
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def store_address(self) -> StoreAddress:
        """``redis_url``, parsed: one server, a cluster, or Sentinel."""
        return parse_store_url(self.redis_url)

    def validate(self) -> None:
        """Check cross-field rules; raise ConfigurationError naming the setting."""
        if self.worker_timeout <= self.heartbeat_interval:
            raise ConfigurationError(
                "reliable_worker_timeout",
                f"must be greater than reliable_heartbeat_interval "
                f"({self.worker_timeout} <= {self.heartbeat_interval}); "
                "otherwise live workers would be declared dead",
            )
        address = self.store_address
        if address.kind == "sentinel" and not self.redis_sentinel_master:
            raise ConfigurationError(
                "reliable_redis_sentinel_master",
                f"required with a sentinel:// store ({sanitized_url(self.redis_url)}): "
                "the name of the master the Sentinels watch",
            )
        if address.kind != "sentinel" and self.redis_sentinel_master:
            raise ConfigurationError(
                "reliable_redis_sentinel_master",
                f"only used with a sentinel:// reliable_redis_url, which is "
                f"{sanitized_url(self.redis_url)}",
            )


def _hint(name: str, known: set[str]) -> str:
    """``; did you mean reliable_x?`` for the closest known setting, if one is close."""
    close = difflib.get_close_matches(name[len(CONF_PREFIX) :], sorted(known), n=1)
    return f"; did you mean {CONF_PREFIX}{close[0]}?" if close else ""


def store_url_from_broker(app: Any, master: str | None = None) -> tuple[str, str | None]:
    """The store URL (and Sentinel master name) to use when ``reliable_redis_url`` is unset.

    A ``redis://``, ``rediss://`` or ``unix://`` broker is reused as it is (its first URL
    when several are given for failover). A ``sentinel://`` broker is followed: the same
    Sentinels and ``broker_transport_options["master_name"]``. A non-Redis broker gives
    :data:`DEFAULT_REDIS_URL`. ``master`` is ``reliable_redis_sentinel_master`` when set
    (it then wins over the broker's master name).

    Raises:
        ConfigurationError: the broker is Redis but cannot serve as the store (kombu's
            ``redis+socket://``, or Sentinel without a master name): set
            ``reliable_redis_url``.
    """
    broker = app.conf.broker_url
    if not isinstance(broker, str) or "://" not in broker:
        return DEFAULT_REDIS_URL, None
    first = broker.split(";")[0].strip()
    scheme = first.split("://", 1)[0].lower()
    if scheme in STANDALONE_SCHEMES:
        return first, None
    if scheme == SENTINEL_SCHEME:
        options = app.conf.broker_transport_options or {}
        master = master or options.get("master_name")
        if not master:
            raise ConfigurationError(
                "reliable_redis_url",
                f"the broker {sanitized_url(broker)} is Sentinel but "
                'broker_transport_options["master_name"] is not set, so the store cannot '
                "follow it: set reliable_redis_url (and reliable_redis_sentinel_master)",
            )
        parse_store_url(broker, "broker_url")
        return broker, str(master) if master else None
    if scheme in UNREUSABLE_BROKER_SCHEMES or scheme.startswith("redis"):
        raise ConfigurationError(
            "reliable_redis_url",
            f"the broker {sanitized_url(broker)} cannot serve as the coordination "
            "store: set reliable_redis_url (e.g. unix:///run/redis.sock?db=1 or "
            "redis://host:6379/1)",
        )
    return DEFAULT_REDIS_URL, None


# --- store addresses: reliable_redis_url, parsed once (redis, cluster or sentinel) ---

#: URL schemes of one Redis server (``unix://`` is a socket path).
STANDALONE_SCHEMES = ("redis", "rediss", "unix")
#: URL schemes of Redis Cluster (``rediss+cluster`` with TLS): seed nodes, comma-separated.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: URL scheme of Redis Sentinel: ``sentinel://HOST:PORT[;sentinel://HOST:PORT...]``.
SENTINEL_SCHEME = "sentinel"
#: Port of a cluster node when its URL names none.
DEFAULT_REDIS_PORT = 6379
#: Port of a Sentinel when its URL names none.
DEFAULT_SENTINEL_PORT = 26379
#: Broker URL schemes of kombu's Redis transport that name no reusable server
#: (a unix socket in kombu's own syntax): set ``reliable_redis_url`` explicitly.
UNREUSABLE_BROKER_SCHEMES = ("redis+socket", "socket")


@dataclass(frozen=True)
class StoreAddress:
    """Where the coordination store lives, as parsed from ``reliable_redis_url``.

    Parameters:
      kind: ``standalone`` (one server: ``redis://``, ``rediss://``, ``unix://``),
        ``cluster`` (Redis Cluster) or ``sentinel`` (a master found through Sentinel).
      url: the URL as configured.
      nodes: cluster seed nodes or sentinels, ``(host, port)``; empty for standalone.
      username, password: credentials of the Redis servers (not of the sentinels).
      db: database number (always 0 on a cluster).
      ssl: TLS to the cluster nodes.

    Examples:
        >>> parse_store_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7000/").nodes
        (('10.0.0.1', 7000), ('10.0.0.2', 7000))
    """

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: bool = False


def sanitized_url(url: str) -> str:
    """``url`` with its password masked, for messages (even when the URL is malformed)."""
    try:
        return str(maybe_sanitize_url(url))
    except ValueError:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1**@", url)


def parse_store_url(url: str, source: str = "reliable_redis_url") -> StoreAddress:
    """Parse a store URL; raise :class:`ConfigurationError` naming ``source`` if it is bad."""
    if not isinstance(url, str):
        raise ConfigurationError(source, f"expected a URL string, got {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in STANDALONE_SCHEMES:
        return StoreAddress("standalone", url)
    if scheme in CLUSTER_SCHEMES:
        return _cluster_address(url, source, ssl=scheme.startswith("rediss"))
    if scheme == SENTINEL_SCHEME:
        return _sentinel_address(url, source)
    raise ConfigurationError(
        source,
        "expected a redis://, rediss://, unix://, redis+cluster://, rediss+cluster:// or "
        f"sentinel:// URL, got {sanitized_url(url)!r}",
    )


def _host_port(text: str, default_port: int, source: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(source, f"bad HOST:PORT {text!r} in {sanitized_url(url)!r}")
    return host, int(port)


def _db(path: str, source: str, url: str) -> int:
    path = path.strip("/")
    if not path:
        return 0
    if not path.isdigit():
        raise ConfigurationError(
            source,
            f"expected a database number after '/', got {path!r} in {sanitized_url(url)!r}",
        )
    return int(path)


def _split(url: str, source: str) -> tuple[str | None, str | None, str, str]:
    """``(username, password, hosts, path)`` of ``scheme://[user:pass@]hosts[/path]``."""
    rest = url.split("://", 1)[1]
    if "?" in rest:
        raise ConfigurationError(
            source, f"query options are not supported in {sanitized_url(url)!r}"
        )
    hosts, _, path = rest.partition("/")
    username = password = None
    if "@" in hosts:
        userinfo, _, hosts = hosts.rpartition("@")
        user, has_pw, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    return username, password, hosts, path


def _cluster_address(url: str, source: str, ssl: bool) -> StoreAddress:
    username, password, hosts, path = _split(url, source)
    nodes = tuple(
        _host_port(h.strip(), DEFAULT_REDIS_PORT, source, url)
        for h in hosts.split(",")
        if h.strip()
    )
    if not nodes:
        raise ConfigurationError(
            source, f"a cluster URL needs at least one HOST:PORT, got {sanitized_url(url)!r}"
        )
    if _db(path, source, url) != 0:
        raise ConfigurationError(
            source, f"Redis Cluster has only database 0, got {sanitized_url(url)!r}"
        )
    return StoreAddress("cluster", url, nodes, username, password, 0, ssl)


def _sentinel_address(url: str, source: str) -> StoreAddress:
    nodes: list[tuple[str, int]] = []
    username = password = None
    db: int | None = None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        if not part.lower().startswith(SENTINEL_SCHEME + "://"):
            raise ConfigurationError(
                source,
                "every part of a Sentinel URL starts with sentinel://, got "
                f"{sanitized_url(part)!r}",
            )
        user, pw, hosts, path = _split(part, source)
        nodes.append(_host_port(hosts, DEFAULT_SENTINEL_PORT, source, url))
        username, password = username or user, password or pw
        if db is None and path.strip("/"):
            db = _db(path, source, url)
    return StoreAddress("sentinel", url, tuple(nodes), username, password, db or 0)


# --- converters: (source name, raw value) -> typed value, raising ConfigurationError ---


def _number(
    kind: type, minimum: float, exclusive: bool, maximum: float
) -> Callable[[str, Any], Any]:
    def convert(source: str, raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ConfigurationError(source, f"expected a number, got {raw!r}")
        try:
            value = kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigurationError(source, f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):  # NaN passes every comparison below
            raise ConfigurationError(source, f"expected a finite number, got {raw!r}")
        if kind is int and isinstance(raw, float) and raw != value:
            raise ConfigurationError(source, f"expected a whole number, got {raw!r}")
        if value < minimum or (exclusive and value == minimum):
            op = ">" if exclusive else ">="
            raise ConfigurationError(source, f"must be {op} {minimum}, got {raw!r}")
        if value > maximum:
            raise ConfigurationError(source, f"must be <= {maximum:.0f}, got {raw!r}")
        return value

    return convert


def _positive_float(source: str, raw: Any) -> float:
    return float(_number(float, 0, exclusive=True, maximum=MAX_SECONDS)(source, raw))


def _positive_int(source: str, raw: Any) -> int:
    return int(_number(int, 1, exclusive=False, maximum=MAX_WHOLE_NUMBER)(source, raw))


def _non_negative_int(source: str, raw: Any) -> int:
    return int(_number(int, 0, exclusive=False, maximum=MAX_WHOLE_NUMBER)(source, raw))


def _port(source: str, raw: Any) -> int:
    value = int(_number(int, 0, exclusive=False, maximum=MAX_WHOLE_NUMBER)(source, raw))
    if value > 65535:
        raise ConfigurationError(source, f"must be a TCP port (0-65535), got {raw!r}")
    return value


def _address(source: str, raw: Any) -> str:
    text = raw.strip() if isinstance(raw, str) else ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if text and len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
        return text
    raise ConfigurationError(
        source, f"expected an IP address (0.0.0.0, 127.0.0.1, ::) or a host name, got {raw!r}"
    )


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
    parse_store_url(raw, source)
    return str(raw)


def _sentinel_master(source: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigurationError(source, f"expected a master name, got {raw!r}")
    return raw.strip()


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
    "metrics_address": _address,
    "ordering_gap_timeout": _positive_float,
    "embedded_reaper": _bool,
    "fail_open": _bool,
    "redis_sentinel_master": _sentinel_master,
    "fetch": _bool,
}
