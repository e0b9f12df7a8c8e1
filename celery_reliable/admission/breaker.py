"""Circuit breakers shared by every worker process, on pybreaker, with state in Redis.

Each ``breaker`` name has one :class:`pybreaker.CircuitBreaker` per process (its
configuration, its ``exclude`` semantics and its listeners), whose storage is a read-only
mirror of one Redis hash. Every transition is made atomically by a Lua script —
``admit.lua`` (open -> half-open, granting the single probe) and
``breaker_report.lua`` (failure counting, closed -> open, half-open -> closed/open) —
and the mirror is refreshed from each script's reply, so pybreaker's listeners see the
cluster's state changes. pybreaker's own ``CircuitRedisStorage`` is not used: its
read-modify-write steps are separate commands that race across processes, and its
half-open state lets every caller through.

Examples:
    >>> spec = BreakerSpec.for_task(task)       # None when the task has no breaker
    >>> breaker_for(spec).current_state
    'closed'
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pybreaker

from ..core import compat, instruments
from ..core.config import MAX_SECONDS
from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

#: While a probe runs, other tasks of the breaker look again after at most this long.
HALF_OPEN_RECHECK_SECONDS = 1.0
#: Seconds a probe holds the half-open breaker when the task sets no ``time_limit`` and
#: no ``breaker_probe_lease``: if its worker dies, another probe may go after this.
DEFAULT_PROBE_LEASE = 60.0

STATE_CLOSED = pybreaker.STATE_CLOSED
STATE_OPEN = pybreaker.STATE_OPEN
STATE_HALF_OPEN = pybreaker.STATE_HALF_OPEN


@dataclass(frozen=True)
class BreakerSpec:
    """The breaker a task is guarded by, as read from its options.

    Parameters:
      name: ``breaker``; tasks sharing it share the breaker.
      fail_max: ``breaker_fail_max`` consecutive failures (cluster-wide) open it.
      reset_timeout: ``breaker_reset_timeout`` seconds open before one probe may run.
      exclude: ``breaker_exclude`` exception types that do not count as failures.
      probe_lease: seconds the probe holds the half-open breaker (``breaker_probe_lease``,
        else the task's ``time_limit``, else :data:`DEFAULT_PROBE_LEASE`).
    """

    name: str
    fail_max: int
    reset_timeout: float
    exclude: tuple[type[BaseException], ...]
    probe_lease: float

    @classmethod
    def for_task(cls, task: Any) -> BreakerSpec | None:
        """The spec of ``task``'s options, None when it has no ``breaker``.

        Raises:
            ConfigurationError: naming the invalid option and the task.
        """
        name = getattr(task, "breaker", None)
        if name is None:
            return None
        tname = task.name
        if not isinstance(name, str) or not name or any(c in name for c in "{} \t\n"):
            raise ConfigurationError(
                "breaker", f"task {tname!r}: expected a name without braces or spaces, got {name!r}"
            )
        fail_max = getattr(task, "breaker_fail_max", 5)
        if isinstance(fail_max, bool) or not isinstance(fail_max, int) or fail_max < 1:
            raise ConfigurationError(
                "breaker_fail_max",
                f"task {tname!r}: expected a whole number >= 1, got {fail_max!r}",
            )
        reset = _positive(
            "breaker_reset_timeout", getattr(task, "breaker_reset_timeout", 30.0), tname
        )
        exclude = getattr(task, "breaker_exclude", ()) or ()
        if isinstance(exclude, type):
            exclude = (exclude,)
        if not all(isinstance(e, type) and issubclass(e, BaseException) for e in exclude):
            raise ConfigurationError(
                "breaker_exclude", f"task {tname!r}: expected exception types, got {exclude!r}"
            )
        lease_raw = getattr(task, "breaker_probe_lease", None)
        if lease_raw is None:
            lease_raw = getattr(task, "time_limit", None) or DEFAULT_PROBE_LEASE
        lease = _positive("breaker_probe_lease", lease_raw, tname)
        return cls(name, fail_max, reset, tuple(exclude), lease)


def _positive(option: str, value: Any, task: str) -> float:
    # NaN passes "<= 0"; infinity and 1e308 overflow the deadlines computed from it
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_SECONDS
    ):
        raise ConfigurationError(
            option, f"task {task!r}: expected a number > 0 and <= {MAX_SECONDS:.0f}, got {value!r}"
        )
    return float(value)


class SharedStateStorage(pybreaker.CircuitBreakerStorage):  # type: ignore[misc]
    """pybreaker storage mirroring one breaker's Redis hash in this process.

    pybreaker's own mutators (``state = ...``, ``increment_counter``...) are no-ops here:
    the cluster's state moves only in Lua, and :meth:`update` copies each script's reply in.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._state = STATE_CLOSED
        self._counter = 0
        self._opened_at: datetime | None = None

    def update(self, state: str, counter: int, opened_at_us: int | None = None) -> None:
        """Copy the cluster's state into the mirror."""
        self._state = state
        self._counter = counter
        if opened_at_us:
            self._opened_at = datetime.fromtimestamp(opened_at_us / 1e6, tz=timezone.utc)

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:  # transitions happen in Lua only
        pass

    def increment_counter(self) -> None:
        pass

    def reset_counter(self) -> None:
        pass

    def increment_success_counter(self) -> None:
        pass

    def reset_success_counter(self) -> None:
        pass

    @property
    def counter(self) -> int:
        return self._counter

    @property
    def success_counter(self) -> int:
        return 0

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        pass


class LoggingListener(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    """Logs each state change this process notices (pybreaker notifies on the next read)."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = getattr(old_state, "name", None)
        logger.info(
            "celery_reliable: breaker %r seen %s -> %s (failures %d)",
            cb.name,
            old,
            new_state.name,
            cb.fail_counter,
        )


_breakers: dict[str, pybreaker.CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(spec: BreakerSpec) -> pybreaker.CircuitBreaker:
    """This process's pybreaker object of ``spec.name`` (shared-state mirror, logging)."""
    cb = _breakers.get(spec.name)
    if cb is None:
        with _breakers_lock:
            cb = _breakers.get(spec.name)
            if cb is None:
                cb = pybreaker.CircuitBreaker(
                    fail_max=spec.fail_max,
                    reset_timeout=spec.reset_timeout,
                    exclude=list(spec.exclude),
                    listeners=[LoggingListener()],
                    state_storage=SharedStateStorage(spec.name),
                    name=spec.name,
                )
                _breakers[spec.name] = cb
    return cb


def observe(spec: BreakerSpec, state: str, fails: int, opened_at_us: int | None = None) -> None:
    """Copy a script's view of the breaker into pybreaker and let it notify listeners."""
    cb = breaker_for(spec)
    storage = compat.breaker_storage(cb)
    assert isinstance(storage, SharedStateStorage)
    storage.update(state, fails, opened_at_us)
    cb.state  # noqa: B018 (pybreaker notices the change on read and notifies listeners)
    instruments.breaker_state(spec.name, state)


def outcome_kind(spec: BreakerSpec, exc: BaseException | None, kind: str) -> str:
    """How a run's outcome counts: ``success``, ``failure`` or ``release`` (neither).

    Follows pybreaker: an excluded exception counts as a success. A retry counts as a
    failure of its cause (``Retry.exc``) and as nothing when it has none.
    """
    if kind == "succeeded":
        return "success"
    if kind == "failed":
        cause = exc
    elif kind == "retry":
        cause = getattr(exc, "exc", None)
        if not isinstance(cause, BaseException):
            return "release"
    else:  # ignored, deferred: the run proved nothing
        return "release"
    assert cause is not None
    return "failure" if breaker_for(spec).is_system_error(cause) else "success"
