"""Every private part of Celery, kombu, billiard and pybreaker that celery_reliable uses.

celery_reliable hooks into places the libraries do not document: attributes with a
leading underscore, worker state, and methods it replaces on live objects. Each such
place is one :class:`Touchpoint` in :data:`TOUCHPOINTS`, with what relies on it and the
releases it was read in; the rest of the package reaches them only through the functions
below. :func:`check_touchpoints` (called by ``install()``) fails when one is missing in
the installed releases, naming it, so a rename in a new release stops the worker at start
instead of quietly switching a guarantee off.

Checked against: celery 5.5.3, 5.6.3, 5.7.0; kombu 5.5.4, 5.6.2, 5.7.0; billiard 4.2.1,
4.3.2; pybreaker 1.2.0, 1.4.1; redis-py 5.0.8, 5.3.1, 8.1.0 (the version matrix in
noxfile.py).

Examples:
    >>> from celery_reliable.core import compat
    >>> compat.missing_touchpoints()
    []
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import IncompatibleVersion
from . import kombu_redis

__all__ = [
    "TOUCHPOINTS",
    "Touchpoint",
    "apply_result",
    "breaker_storage",
    "brpop_pending",
    "check_touchpoints",
    "delivered_tags",
    "dump_pydantic_arguments",
    "eta_requests",
    "key_prefix",
    "mark_cancelled",
    "missing_touchpoints",
    "pool_waiters",
    "remove_from_unacked_indices",
    "restore_unacked_message",
    "scheduled_requests",
    "sent_to_pool",
]

#: The releases every touchpoint below was read in (and the version matrix runs).
CHECKED_CELERY = "celery 5.5.3, 5.6.3, 5.7.0"
CHECKED_KOMBU = "kombu 5.5.4, 5.6.2, 5.7.0"
CHECKED_BILLIARD = "billiard 4.2.1, 4.3.2"
CHECKED_PYBREAKER = "pybreaker 1.2.0, 1.4.1"

#: First Celery release that tracks ETA requests in ``state.scheduled_requests``.
SCHEDULED_REQUESTS_SINCE = (5, 7)
#: First release (Celery and its kombu) with the BRPOP health check's attributes.
KOMBU_BRPOP_HEALTH_SINCE = (5, 7)
#: First Celery release whose ``apply_async`` dumps pydantic model arguments.
PYDANTIC_DUMP_SINCE = (5, 7)


def _version(dist: str) -> tuple[int, int]:
    try:
        parts = importlib.metadata.version(dist).split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (importlib.metadata.PackageNotFoundError, IndexError, ValueError):
        return (0, 0)


CELERY_VERSION = _version("celery")


@dataclasses.dataclass(frozen=True)
class Touchpoint:
    """One private place of a library that celery_reliable reads or replaces.

    Parameters:
      name: dotted path of the place (``module.Class.attribute``).
      used_by: what relies on it.
      checked: the releases it was read in.
      exists: returns True when the installed release has it.
    """

    name: str
    used_by: str
    checked: str
    exists: Callable[[], bool]


def _resolve(path: str) -> Any:
    """Import ``module.sub:Attr.attr`` and return the object (AttributeError if absent)."""
    module_name, _, attrs = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attrs.split(".") if attrs else ():
        obj = getattr(obj, attr)
    return obj


def _has(path: str, attr: str) -> Callable[[], bool]:
    """``path`` has ``attr`` (as a class attribute, or assigned in its ``__init__``)."""

    def check() -> bool:
        owner = _resolve(path)
        if hasattr(owner, attr):
            return True
        init = getattr(owner, "__init__", None)
        code = getattr(init, "__code__", None)
        return code is not None and attr in code.co_names

    return check


def _accepts(path: str, *params: str) -> Callable[[], bool]:
    """The callable at ``path`` takes every named parameter."""

    def check() -> bool:
        names = inspect.signature(_resolve(path)).parameters
        return all(p in names for p in params)

    return check


def _since(version: tuple[int, int], check: Callable[[], bool]) -> Callable[[], bool]:
    """``check`` holds, or the installed Celery is older than ``version`` (not needed)."""
    return lambda: version > CELERY_VERSION or check()


_C, _K, _B, _P = CHECKED_CELERY, CHECKED_KOMBU, CHECKED_BILLIARD, CHECKED_PYBREAKER
_STATE = "celery.worker.state"
_REQUEST = "celery.worker.request:Request"
_CONSUMER = "celery.worker.consumer.consumer:Consumer"
_REDIS_QOS = "kombu.transport.redis:QoS"
_REDIS_CHANNEL = "kombu.transport.redis:Channel"

_POINTS: tuple[Touchpoint, ...] = (
    # --- Celery worker state ---
    Touchpoint(
        f"{_STATE}.should_stop",
        "drain: stops the worker through Celery's warm shutdown",
        _C,
        _has(_STATE, "should_stop"),
    ),
    Touchpoint(
        f"{_STATE}.should_terminate",
        "drain: a second signal while the broker is unreachable stops the worker cold",
        _C,
        _has(_STATE, "should_terminate"),
    ),
    Touchpoint(
        f"{_STATE}.scheduled_requests",
        "drain, orphans: requests waiting for their ETA (celery >= 5.7)",
        "celery 5.7.0",
        _since(SCHEDULED_REQUESTS_SINCE, _has(_STATE, "scheduled_requests")),
    ),
    Touchpoint(
        f"{_REQUEST}._eta_timer_entry",
        "drain: cancels the timer entry of an ETA request it gives back (celery >= 5.7)",
        "celery 5.7.0",
        _since(SCHEDULED_REQUESTS_SINCE, _has(_REQUEST, "_eta_timer_entry")),
    ),
    Touchpoint(
        f"{_CONSUMER}.apply_eta_task",
        "drain: finds ETA requests in the timer's schedule (celery < 5.7)",
        _C,
        _has(_CONSUMER, "apply_eta_task"),
    ),
    Touchpoint(
        f"{_REQUEST}._apply_result",
        "drain: ends the pool process of a job the pool has not accepted yet",
        _C,
        _has(_REQUEST, "_apply_result"),
    ),
    Touchpoint(
        f"{_REQUEST}._already_cancelled",
        "drain: a job ended at the deadline is neither acked nor failed",
        _C,
        _has(_REQUEST, "_already_cancelled"),
    ),
    # --- Celery consumer: methods replaced on the live consumer ---
    *(
        Touchpoint(
            f"{_CONSUMER}.{name}",
            f"{by}: replaced on the consumer",
            _C,
            _has(_CONSUMER, name),
        )
        for name, by in (
            ("on_decode_error", "dead letters (bad input)"),
            ("on_unknown_message", "dead letters (bad input)"),
            ("on_unknown_task", "dead letters (bad input)"),
            ("on_invalid_task", "dead letters (bad input)"),
            ("create_task_handler", "dead letters (bad input)"),
            ("add_task_queue", "drain: refuses a remote add_consumer while draining"),
        )
    ),
    Touchpoint(
        "celery.app.task:Task._dump_pydantic_arguments",
        "ReliableTask.apply_async: sizes pydantic model arguments as Celery sends them "
        "(celery >= 5.7)",
        "celery 5.7.0",
        _since(PYDANTIC_DUMP_SINCE, _has("celery.app.task:Task", "_dump_pydantic_arguments")),
    ),
    Touchpoint(
        "celery.app.base:Celery.send_task",
        "ordering: replaced on the app to give ordered tasks their place at publish",
        _C,
        _accepts("celery.app.base:Celery.send_task", "name", "args", "kwargs"),
    ),
    # --- kombu ---
    Touchpoint(
        "kombu.asynchronous.semaphore:LaxBoundedSemaphore._waiting",
        "drain: prefetched requests waiting for a free pool process",
        _K,
        _has("kombu.asynchronous.semaphore:LaxBoundedSemaphore", "_waiting"),
    ),
    Touchpoint(
        "kombu.asynchronous.hub:Hub.fire_timers(min_delay)",
        "admission: replaced on the hub so due timers fire without a 1 s pause",
        _K,
        _accepts("kombu.asynchronous.hub:Hub.fire_timers", "min_delay"),
    ),
    Touchpoint(
        f"{_REDIS_QOS}.ack/reject/append",
        "orphans: replaced on the task channel's QoS (no ack for a message a reaper took)",
        _K,
        lambda: all(_has(_REDIS_QOS, m)() for m in ("ack", "reject", "append")),
    ),
    Touchpoint(
        "kombu.transport.virtual.base:QoS._delivered",
        "orphans: delivery tags still unacknowledged on the task channel",
        _K,
        _has("kombu.transport.virtual.base:QoS", "_delivered"),
    ),
    Touchpoint(
        f"{_REDIS_QOS}.restore_by_tag(leftmost)",
        "drain: gives a prefetched message back to the head of its queue",
        _K,
        _accepts(f"{_REDIS_QOS}.restore_by_tag", "tag", "client", "leftmost"),
    ),
    Touchpoint(
        f"{_REDIS_QOS}._remove_from_indices",
        "reaper: removes a recovered message from kombu's unacked hash and index",
        _K,
        _accepts(f"{_REDIS_QOS}._remove_from_indices", "delivery_tag", "pipe"),
    ),
    Touchpoint(
        f"{_REDIS_CHANNEL}._do_restore_message",
        "reaper: puts a recovered message back on its queue in the same transaction",
        _K,
        _accepts(
            f"{_REDIS_CHANNEL}._do_restore_message",
            "payload",
            "exchange",
            "routing_key",
            "pipe",
            "leftmost",
        ),
    ),
    Touchpoint(
        f"{_REDIS_CHANNEL}._in_poll",
        "drain: waits for a BRPOP sent before the cancel to come back",
        _K,
        _has(_REDIS_CHANNEL, "_in_poll"),
    ),
    Touchpoint(
        "kombu.transport.redis:PrefixedStrictRedis.global_keyprefix",
        "reaper: the broker's global_keyprefix on kombu's own client",
        _K,
        _has("kombu.transport.redis:PrefixedStrictRedis", "global_keyprefix"),
    ),
    # --- billiard ---
    Touchpoint(
        "billiard.pool:ApplyResult.terminate(signum)",
        "drain: ends a job the pool has not accepted yet, at the deadline",
        _B,
        _accepts("billiard.pool:ApplyResult.terminate", "signum"),
    ),
    # --- pybreaker ---
    Touchpoint(
        "pybreaker:CircuitBreaker._state_storage",
        "admission: copies the cluster's breaker state into the local breaker",
        _P,
        _has("pybreaker:CircuitBreaker", "_state_storage"),
    ),
)

#: The kombu Redis transport's private parts that reliable fetch uses
#: (:mod:`celery_reliable.core.compat.kombu_redis` is its only accessor).
_FETCH_POINTS: tuple[Touchpoint, ...] = tuple(
    Touchpoint(
        f"{owner.__module__}:{owner.__qualname__}.{attr}",
        f"reliable fetch: {use}",
        _K,
        _since(
            KOMBU_BRPOP_HEALTH_SINCE if attr in kombu_redis.SINCE_KOMBU_5_7 else (0, 0),
            _has(f"{owner.__module__}:{owner.__qualname__}", attr),
        ),
    )
    for owner, attr, use in kombu_redis.TOUCHPOINTS
)


def _all_of(*checks: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(check() for check in checks)


def _merged(points: tuple[Touchpoint, ...]) -> tuple[Touchpoint, ...]:
    """One entry per place: a place several features rely on names each of them."""
    by_name: dict[str, Touchpoint] = {}
    for point in points:
        name = point.name.replace(":", ".")
        seen = by_name.get(name)
        if seen is None:
            by_name[name] = dataclasses.replace(point, name=name)
        else:
            by_name[name] = dataclasses.replace(
                seen,
                used_by=f"{seen.used_by}; {point.used_by}",
                exists=_all_of(seen.exists, point.exists),
            )
    return tuple(by_name.values())


#: Every private touchpoint (``package.module.Class.attribute``), by layer of the package.
TOUCHPOINTS: tuple[Touchpoint, ...] = _merged(_POINTS + _FETCH_POINTS)


def missing_touchpoints() -> list[str]:
    """Names of the touchpoints the installed releases lack (empty when all are there)."""
    missing = []
    for point in TOUCHPOINTS:
        try:
            ok = point.exists()
        except (ImportError, AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            missing.append(point.name)
    return missing


def check_touchpoints() -> None:
    """Fail when an installed release lacks a touchpoint.

    Raises:
        IncompatibleVersion: naming every missing touchpoint and what relies on it.
    """
    missing = set(missing_touchpoints())
    if missing:
        raise IncompatibleVersion(
            [(p.name, p.used_by, p.checked) for p in TOUCHPOINTS if p.name in missing]
        )


# --- accessors: the only code outside this module that touches the places above ---


def pool_waiters(worker: Any) -> Any:
    """The deque of requests waiting for a free pool process (None without a semaphore)."""
    semaphore = getattr(worker, "semaphore", None)
    return None if semaphore is None else semaphore._waiting


def scheduled_requests() -> list[Any]:
    """Requests held by this worker until their ETA, as far as ``celery.worker.state``
    tracks them (celery >= 5.7; older releases only hold them in the timer: see
    :func:`eta_requests`)."""
    from celery.worker import state

    return list(getattr(state, "scheduled_requests", ()))


def eta_requests(timer: Any) -> Iterator[tuple[Any, Any]]:
    """``(request, timer entry)`` of every request waiting for its ETA in ``timer``.

    Celery 5.7 tracks them in ``state.scheduled_requests`` with the entry on the request;
    older releases keep them only as timer entries whose first argument is the request
    (``Consumer.apply_eta_task(req)``, or ``limit_post_eta(req, bucket, 1)`` under a rate
    limit), so their schedule is read instead.
    """
    if CELERY_VERSION >= SCHEDULED_REQUESTS_SINCE:
        for request in scheduled_requests():
            yield request, request._eta_timer_entry
        return
    if timer is None:
        return
    for scheduled in timer.queue:
        entry = scheduled[-1]
        args = getattr(entry, "args", None)
        if entry.canceled or not args:
            continue
        request = args[0]
        if hasattr(request, "message") and hasattr(request, "acknowledged"):
            yield request, entry


def apply_result(request: Any) -> Any:
    """The pool job of a request sent to the pool (None once accepted or never sent)."""
    ref = request._apply_result
    return ref() if ref is not None else None


def sent_to_pool(request: Any) -> bool:
    """Whether the worker handed the request to its pool (it may be running)."""
    return request._apply_result is not None or request.time_start is not None


def mark_cancelled(request: Any) -> None:
    """Make Celery treat the request's termination as a cancel: no ack, no failure."""
    request._already_cancelled = True


def brpop_pending(channel: Any) -> bool:
    """Whether a Redis channel has a BRPOP in flight (False for other transports)."""
    return bool(getattr(channel, "_in_poll", False)) if channel is not None else False


def delivered_tags(qos: Any) -> list[Any]:
    """Delivery tags unacknowledged on a virtual-transport QoS (a copy)."""
    return list(qos._delivered)


def remove_from_unacked_indices(qos: Any, tag: str, pipe: Any) -> None:
    """Queue the removal of ``tag`` from kombu's unacked hash and index on ``pipe``."""
    qos._remove_from_indices(tag, pipe)


def restore_unacked_message(
    channel: Any, payload: Any, exchange: str, routing_key: str, pipe: Any
) -> None:
    """Queue the push of an unacked message back onto its queue(s) on ``pipe``."""
    channel._do_restore_message(payload, exchange, routing_key, pipe, False)


def key_prefix(client: Any) -> str:
    """kombu's ``global_keyprefix`` of a broker client ('' for a plain redis client)."""
    return str(getattr(client, "global_keyprefix", "") or "")


def breaker_storage(breaker: Any) -> Any:
    """The state storage of a pybreaker ``CircuitBreaker``."""
    return breaker._state_storage


def dump_pydantic_arguments(
    task: Any, args: Any, kwargs: Any, serializer: str | None
) -> tuple[Any, Any]:
    """``(args, kwargs)`` as Celery will send them: pydantic models dumped for a
    ``pydantic=True`` task (celery >= 5.7 dumps them in ``apply_async``), unchanged
    otherwise."""
    dump = getattr(task, "_dump_pydantic_arguments", None)
    if dump is None or serializer == "pickle":
        return args, kwargs
    with contextlib.suppress(Exception):  # Celery reports a bad argument itself
        return dump(args, kwargs)  # type: ignore[no-any-return]
    return args, kwargs
