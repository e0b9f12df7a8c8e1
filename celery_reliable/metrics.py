"""Prometheus metrics, aggregated across a prefork worker's processes.

Turned on by ``reliable_metrics_port``: the worker's main process then serves
``http://<host>:<port>/metrics`` with the sum over itself and every pool process, using
prometheus-client's multiprocess mode. The mode is chosen when prometheus_client is first
imported, so the worker step below sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per
worker instance, unless you set one) before anything imports it, and before the pool forks.

Every feature records through the functions here; they are no-ops when metrics are off, so
tasks of a worker without a metrics port pay nothing.

Metric names (all prefixed ``celery_reliable_``):

- ``tasks_total{task,outcome}``: ReliableTask runs by outcome (succeeded, failed, retry,
  ignored, deferred).
- ``dead_letters_total{task,reason}``: dead letters written by this worker.
- ``events_total{feature,event}``: feature events (recoveries, breaker transitions, gap
  skips, drains...).
- ``breaker_state{breaker}``: 0 closed, 1 half-open, 2 open (last value seen by any process).

Examples:
    >>> app.conf.reliable_metrics_port = 9808
    $ curl -s localhost:9808/metrics | grep celery_reliable_tasks_total
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

from celery import bootsteps

from .extensions import ORDER_METRICS, Outcome
from .install import feature, settings_of

logger = logging.getLogger(__name__)

#: Prefix of every metric name.
NAMESPACE = "celery_reliable"
#: Environment variable that puts prometheus_client in multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between sweeps that drop the live gauges of pool processes that died.
DEAD_PROCESS_SWEEP_INTERVAL = 30.0
#: ``breaker_state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}

_enabled = False
_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()


def enabled() -> bool:
    """True in a worker (and its pool processes) that serves metrics."""
    return _enabled


#: name -> (kind, help text, label names) of every metric; created on first use.
_DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tasks": ("counter", "ReliableTask runs by outcome", ("task", "outcome")),
    "dead_letters": ("counter", "Dead letters written", ("task", "reason")),
    "events": ("counter", "Reliability feature events", ("feature", "event")),
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


class MetricsExtension:
    """Counts every ReliableTask run by outcome (no Redis round trip)."""

    name = "metrics"
    order = ORDER_METRICS

    def applies(self, task: Any) -> bool:
        return _enabled

    def before_start(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        return None

    def after_return(self, task: Any, outcome: Outcome) -> None:
        task_outcome(task.name, outcome.kind)


def _dead_pids(path: str) -> set[int]:
    pids = set()
    for name in os.listdir(path):
        if name.startswith("gauge_live") and name.endswith(".db"):
            with contextlib.suppress(ValueError):
                pids.add(int(name.rsplit("_", 1)[1][:-3]))
    dead = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:
            pass
    return dead


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: multiprocess metrics directory before the fork, HTTP server at start."""

    label = "reliable-metrics"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        global _enabled
        self.port = settings_of(worker.app).metrics_port
        self.owned_dir: str | None = None
        self.server: Any = None
        self.timer_entry: Any = None
        if self.port is None:
            return
        if MULTIPROC_ENV not in os.environ:
            if "prometheus_client" in sys.modules:
                logger.warning(
                    "prometheus_client was imported before the worker started, so pool "
                    "processes cannot be aggregated; set %s in the environment",
                    MULTIPROC_ENV,
                )
            self.owned_dir = tempfile.mkdtemp(prefix="celery-reliable-metrics-")
            os.environ[MULTIPROC_ENV] = self.owned_dir
        _enabled = True

    def include_if(self, worker: Any) -> bool:
        return self.port is not None

    def start(self, worker: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        assert self.port is not None
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        self.server, _ = start_http_server(self.port, registry=registry)
        logger.info("celery_reliable: serving metrics on port %s", self.port)
        if worker.timer is not None:
            self.timer_entry = worker.timer.call_repeatedly(
                DEAD_PROCESS_SWEEP_INTERVAL, self.sweep_dead_processes
            )

    def sweep_dead_processes(self) -> None:
        """Drop live gauges of pool processes that died without cleaning up."""
        from prometheus_client import multiprocess

        path = os.environ.get(MULTIPROC_ENV)
        if path:
            for pid in _dead_pids(path):
                multiprocess.mark_process_dead(pid, path)

    def stop(self, worker: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)


@feature
def install_metrics(app: Any) -> None:
    from .install import add_extension

    app.steps["worker"].add(MetricsStep)
    add_extension(app, MetricsExtension())
