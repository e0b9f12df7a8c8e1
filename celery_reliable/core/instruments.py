"""The metric instruments every feature records through, and the worker's health flags.

The record functions are no-ops until :func:`enable` is called (by
:mod:`celery_reliable.metrics.exporter`, in a worker that serves ``reliable_metrics_port``,
before the pool forks), so tasks of a worker without a metrics port pay nothing. Pool
processes write to prometheus-client's multiprocess files; the worker's main process serves
the sum (see docs/metrics.md).

Worker metric names (all prefixed ``celery_reliable_``; labels are bounded: task names,
reasons, causes, breaker names, operations, never a task id or a key):

- ``tasks_total{task,outcome}``: ReliableTask runs by outcome (succeeded, failed, retry,
  ignored, deferred).
- ``task_duration_seconds{task}``: histogram of run times (tasks that started).
- ``dead_letters_total{task,reason}``: dead letters written by this worker.
- ``deferrals_total{task,cause}``: runs deferred by ``rate_limit``, ``breaker`` or
  ``ordering``.
- ``start_delay_seconds{task}``: histogram of the time from publish (or the ETA asked for)
  to the start of the run, deferrals included.
- ``breaker_state{breaker}``: 0 closed, 1 half-open, 2 open (last value seen here).
- ``draining``: 1 while the worker drains after SIGTERM.
- ``store_errors_total{operation}``: Redis errors met by the worker, by operation.

The health flags (:func:`set_draining`, :func:`set_registered`) are plain process state read
by the worker's ``/readyz``; they are kept whether or not metrics are on.

Examples:
    >>> app.conf.reliable_metrics_port = 9808
    $ curl -s localhost:9808/metrics | grep celery_reliable_tasks_total
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Prefix of every metric name.
NAMESPACE = "celery_reliable"
#: ``breaker_state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}
#: ``deferrals_total`` causes.
DEFERRAL_CAUSES = ("rate_limit", "breaker", "ordering")
#: ``store_errors_total`` operations, created at 0 when a worker starts (so a rate() of
#: them is defined before the first error).
STORE_OPERATIONS = (
    "heartbeat",
    "dead_letter",
    "admission",
    "breaker_report",
    "ordering",
    "ledger",
)
#: Histogram buckets (seconds) of ``task_duration_seconds``.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: Histogram buckets (seconds) of ``start_delay_seconds``: rate limits and breakers hold
#: tasks back for seconds to minutes.
START_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

_enabled = False
_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()

#: name -> (kind, help text, label names) of every worker metric; created on first use.
_DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tasks": ("counter", "ReliableTask runs by outcome", ("task", "outcome")),
    "task_duration_seconds": ("histogram", "Run time of ReliableTasks", ("task",)),
    "dead_letters": ("counter", "Dead letters written by this worker", ("task", "reason")),
    "deferrals": ("counter", "ReliableTask runs deferred, by cause", ("task", "cause")),
    "start_delay_seconds": (
        "histogram",
        "Seconds from publish (or the ETA asked for) to the start of the run",
        ("task",),
    ),
    "breaker_state": (
        "gauge",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        ("breaker",),
    ),
    "draining": ("gauge", "1 while the worker drains after SIGTERM", ()),
    "store_errors": (
        "counter",
        "Errors talking to the coordination Redis, by operation",
        ("operation",),
    ),
}


def enable() -> None:
    """Start recording (the exporter calls this in a worker that serves metrics, before the
    pool forks, so pool processes record too)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    """True in a worker (and its pool processes) that serves metrics."""
    return _enabled


def _metric(name: str) -> Any:
    metric = _metrics.get(name)
    if metric is not None:
        return metric
    with _metrics_lock:
        if name not in _metrics:
            from prometheus_client import Counter, Gauge, Histogram

            kind, text, labels = _DEFINITIONS[name]
            if kind == "gauge":
                _metrics[name] = Gauge(
                    name, text, labels, namespace=NAMESPACE, multiprocess_mode="mostrecent"
                )
            elif kind == "histogram":
                buckets = START_DELAY_BUCKETS if name == "start_delay_seconds" else DURATION_BUCKETS
                _metrics[name] = Histogram(name, text, labels, namespace=NAMESPACE, buckets=buckets)
            else:
                _metrics[name] = Counter(name, text, labels, namespace=NAMESPACE)
        return _metrics[name]


def prepare() -> None:
    """Create the label-less and fixed-label series at 0 (worker start, main process)."""
    if _enabled:
        _metric("draining").set(0)
        for operation in STORE_OPERATIONS:
            _metric("store_errors").labels(operation=operation)


def task_outcome(task: str, outcome: str) -> None:
    """Count one ReliableTask run ending with ``outcome``."""
    if _enabled:
        _metric("tasks").labels(task=task, outcome=outcome).inc()


def task_ran(task: str, duration: float, start_delay: float | None) -> None:
    """Observe one run that started: its duration and, when known, its start delay."""
    if _enabled:
        _metric("task_duration_seconds").labels(task=task).observe(max(0.0, duration))
        if start_delay is not None:
            _metric("start_delay_seconds").labels(task=task).observe(max(0.0, start_delay))


def deferred(task: str, cause: str) -> None:
    """Count one run deferred by ``cause`` (one of :data:`DEFERRAL_CAUSES`)."""
    if _enabled:
        _metric("deferrals").labels(task=task, cause=cause).inc()


def dead_lettered(task: str | None, reason: str) -> None:
    """Count one dead letter written."""
    if _enabled:
        _metric("dead_letters").labels(task=task or "", reason=reason).inc()


def breaker_state(breaker: str, state: str) -> None:
    """Record the state of a circuit breaker (closed, half-open, open)."""
    if _enabled:
        value = BREAKER_STATE_VALUES.get(state)
        if value is not None:
            _metric("breaker_state").labels(breaker=breaker).set(value)


def store_error(operation: str) -> None:
    """Count one error talking to the coordination Redis during ``operation``."""
    if _enabled:
        _metric("store_errors").labels(operation=operation).inc()


# --- health flags of this worker process (read by /readyz) ---

_draining = False
_registered_at: float | None = None
_registration_failing = False


def set_draining(draining: bool) -> None:
    """The worker started (True) or gave up (False) draining."""
    global _draining
    _draining = draining
    if _enabled:
        _metric("draining").set(1 if draining else 0)


def draining() -> bool:
    """True while this worker drains."""
    return _draining


def set_registered(ok: bool) -> None:
    """A heartbeat reached the store (True) or failed (False)."""
    global _registered_at, _registration_failing
    _registration_failing = not ok
    if ok:
        _registered_at = time.monotonic()


def registered(within: float) -> bool:
    """True when the last heartbeat reached the store less than ``within`` seconds ago and
    the latest one did not fail."""
    return (
        _registered_at is not None
        and not _registration_failing
        and time.monotonic() - _registered_at <= within
    )
