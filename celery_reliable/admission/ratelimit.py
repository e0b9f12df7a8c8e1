"""Global rate limits: the task options of one cluster-wide token bucket.

A ReliableTask with ``global_rate_limit="N/s"`` (or ``/m``, ``/h``) draws one token per
start from a bucket in Redis shared by every worker process. The bucket is a GCRA (the
"virtual scheduling" form of a token bucket): Redis keeps one number per bucket, the
theoretical arrival time ``tat``; a start is allowed when ``tat - burst * interval <= now``.
A task that finds no token *reserves* the next free slot and is deferred until that slot,
so deferred tasks come back in the order they asked, one interval apart (see
docs/rate-limits.md). The decision itself is made by ``admit.lua`` together with the
circuit breaker (:mod:`celery_reliable.admission`).

Examples:
    >>> parse_rate("100/s")
    100.0
    >>> spec = BucketSpec.for_task(task)        # None when the task has no limit
    >>> spec.interval_us, spec.burst
    (10000, 100)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError

#: Seconds in each rate unit accepted by ``global_rate_limit``.
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: A deferred task reserves a slot at most this many seconds ahead. Past it, the task is
#: deferred this long without a reservation and asks again (so an ETA message is never
#: held for longer than a fraction of the broker's visibility timeout, 3600 s by default).
MAX_RESERVATION_SECONDS = 300.0
#: A task whose start is due within this many seconds sleeps in the pool process and then
#: starts (its start is booked by the same script call): re-publishing it would cost more
#: broker and event-loop work than the wait, and arrive later. Longer waits are deferred.
SHORT_WAIT_SECONDS = 0.05
#: The smallest allowed interval between two tokens (1 µs: the clock's resolution).
MIN_INTERVAL_US = 1

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")


def parse_rate(value: Any, option: str = "global_rate_limit", task: str = "?") -> float:
    """Tokens per second of a ``"N/s"``, ``"N/m"`` or ``"N/h"`` rate.

    Parameters:
      value: the rate string.
      option, task: named in the error message.

    Raises:
        ConfigurationError: the value is not a positive rate in one of the three units.

    Examples:
        >>> parse_rate("30/m")
        0.5
    """
    if not isinstance(value, str):
        raise ConfigurationError(
            option, f"task {task!r}: expected a string like '100/s', got {value!r}"
        )
    match = _RATE_RE.match(value)
    if match is None:
        raise ConfigurationError(
            option, f"task {task!r}: expected 'N/s', 'N/m' or 'N/h', got {value!r}"
        )
    count = float(match.group(1))
    if count <= 0:
        raise ConfigurationError(option, f"task {task!r}: rate must be > 0, got {value!r}")
    return count / RATE_UNITS[match.group(2)]


def default_burst(rate: float) -> int:
    """One second's worth of tokens, at least 1 (the documented default burst)."""
    return max(1, int(rate))


@dataclass(frozen=True)
class BucketSpec:
    """The bucket a task draws from, as read from its options.

    Parameters:
      rate: tokens per second.
      burst: bucket capacity (tokens that may be spent at once after an idle period).
      key: ``global_rate_key`` — None, a parameter name, or a callable
        ``(*args, **kwargs) -> str | None``.
      name: the bucket's base name (the task name).
    """

    rate: float
    burst: int
    key: str | Callable[..., Any] | None
    name: str

    @property
    def interval_us(self) -> int:
        """Microseconds between two tokens."""
        return max(MIN_INTERVAL_US, round(1_000_000 / self.rate))

    @classmethod
    def for_task(cls, task: Any) -> BucketSpec | None:
        """The spec of ``task``'s options, None when it has no ``global_rate_limit``.

        Raises:
            ConfigurationError: naming the invalid option and the task.
        """
        limit = getattr(task, "global_rate_limit", None)
        name = task.name
        burst_raw = getattr(task, "global_rate_burst", None)
        # A function set as a task option is a class attribute, and would bind as a method
        # (the task passed first): read it unbound, as ordering_key is.
        key = inspect.getattr_static(task, "global_rate_key", None)
        if isinstance(key, (staticmethod, classmethod)):
            key = key.__func__
        if limit is None:
            for option, value in (("global_rate_burst", burst_raw), ("global_rate_key", key)):
                if value is not None:
                    raise ConfigurationError(
                        option, f"task {name!r}: set without global_rate_limit"
                    )
            return None
        rate = parse_rate(limit, task=name)
        if burst_raw is None:
            burst = default_burst(rate)
        elif isinstance(burst_raw, bool) or not isinstance(burst_raw, int) or burst_raw < 1:
            raise ConfigurationError(
                "global_rate_burst",
                f"task {name!r}: expected a whole number >= 1, got {burst_raw!r}",
            )
        else:
            burst = burst_raw
        if key is not None and not (callable(key) or (isinstance(key, str) and key.isidentifier())):
            raise ConfigurationError(
                "global_rate_key",
                f"task {name!r}: expected a parameter name or a callable, got {key!r}",
            )
        if isinstance(key, str) and key.isidentifier():
            _check_parameter(task, key)
        return cls(rate=rate, burst=burst, key=key, name=name)

    def bucket_name(self, args: tuple[Any, ...], kwargs: dict[str, Any], task: Any) -> str:
        """The bucket of one call: the task name, plus ``:<key>`` for per-key buckets.

        Tasks that share a key share a bucket: the key value is the bucket name then
        (``"tenant-a"`` is the same bucket whichever task draws from it), unless it is None.
        """
        if self.key is None:
            return self.name
        value = (
            self.key(*args, **kwargs)
            if callable(self.key)
            else _argument(task, self.key, args, kwargs)
        )
        return self.name if value is None else f"key:{value}"


def _check_parameter(task: Any, param: str) -> None:
    try:
        sig = inspect.signature(task.run)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if param not in params and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        raise ConfigurationError(
            "global_rate_key",
            f"task {task.name!r}: has no parameter {param!r} (parameters: {', '.join(params)})",
        )


def _argument(task: Any, param: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value of parameter ``param`` in a call of ``task`` (positional or keyword)."""
    if param in kwargs:
        return kwargs[param]
    try:
        bound = inspect.signature(task.run).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(param)
