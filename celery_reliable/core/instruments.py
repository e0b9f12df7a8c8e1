"""The metric instruments every feature records through.

The functions here are no-ops until :func:`enable` is called (by
:mod:`celery_reliable.metrics.exporter`, in a worker that serves ``reliable_metrics_port``),
so tasks of a worker without a metrics port pay nothing.

Metric names (all prefixed ``celery_reliable_``):

- ``tasks_total{task,outcome}``: ReliableTask runs by outcome (succeeded, failed, retry,
  ignored, deferred).
- ``dead_letters_total{task,reason}``: dead letters written by this worker.
- ``events_total{feature,event}``: feature events (recoveries, breaker transitions, gap
  skips, drains...).
- ``breaker_state{breaker}``: 0 closed, 1 half-open, 2 open (last value seen by any process).
- ``store_errors_total{operation}``: Redis errors met by this worker, by what it was doing
  (``dead_letter``: a dead-letter write that will be retried or requeued).

Examples:
    >>> app.conf.reliable_metrics_port = 9808
    $ curl -s localhost:9808/metrics | grep celery_reliable_tasks_total
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: Prefix of every metric name.
NAMESPACE = "celery_reliable"
#: ``breaker_state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}

_enabled = False
_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()


def enable() -> None:
    """Start recording (the exporter calls this in a worker that serves metrics, before the
    pool forks, so pool processes record too)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    """True in a worker (and its pool processes) that serves metrics."""
    return _enabled


#: name -> (kind, help text, label names) of every metric; created on first use.
_DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tasks": ("counter", "ReliableTask runs by outcome", ("task", "outcome")),
    "dead_letters": ("counter", "Dead letters written", ("task", "reason")),
    "events": ("counter", "Reliability feature events", ("feature", "event")),
    "store_errors": ("counter", "Redis errors met, by operation", ("operation",)),
    "breaker_state": (
        "gauge",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open",
        ("breaker",),
    ),
}


def _metric(name: str) -> Any:
    metric = _metrics.get(name)
    if metric is not None:
        return metric
    with _metrics_lock:
        if name not in _metrics:
            from prometheus_client import Counter, Gauge

            kind, text, labels = _DEFINITIONS[name]
            if kind == "gauge":
                _metrics[name] = Gauge(
                    name, text, labels, namespace=NAMESPACE, multiprocess_mode="mostrecent"
                )
            else:
                _metrics[name] = Counter(name, text, labels, namespace=NAMESPACE)
        return _metrics[name]


def task_outcome(task: str, outcome: str) -> None:
    """Count one ReliableTask run ending with ``outcome``."""
    if _enabled:
        _metric("tasks").labels(task=task, outcome=outcome).inc()


def dead_lettered(task: str | None, reason: str) -> None:
    """Count one dead letter written."""
    if _enabled:
        _metric("dead_letters").labels(task=task or "", reason=reason).inc()


def event(feature: str, name: str, amount: float = 1) -> None:
    """Count a feature event (``event("reaper", "recovered")``)."""
    if _enabled:
        _metric("events").labels(feature=feature, event=name).inc(amount)


def breaker_state(breaker: str, state: str) -> None:
    """Record the state of a circuit breaker (closed, half-open, open)."""
    if _enabled:
        value = BREAKER_STATE_VALUES.get(state)
        if value is not None:
            _metric("breaker_state").labels(breaker=breaker).set(value)


def store_error(operation: str) -> None:
    """Count one Redis error met while doing ``operation`` (``dead_letter``...)."""
    if _enabled:
        _metric("store_errors").labels(operation=operation).inc()
