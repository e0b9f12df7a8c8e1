"""Serves the worker's Prometheus metrics, aggregated across its prefork processes, and its
health endpoints.

Turned on by ``reliable_metrics_port``: the worker's main process then serves, on that port,

- ``/metrics``: the sum over itself and every pool process, using prometheus-client's
  multiprocess mode. The mode is chosen when prometheus_client is first imported, so
  :class:`MetricsStep` sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per worker
  instance, unless you set one) before anything imports it, and before the pool forks;
- ``/healthz``: 200 while the worker's event loop turns (a timer entry of the loop stamps
  the time every :data:`LOOP_TICK_INTERVAL`; older than :data:`LOOP_STALL_SECONDS`: 503);
- ``/readyz``: 200 only while the worker consumes, its registration reached the store
  within ``reliable_worker_timeout``, and it is not draining.

Files of pool processes that died stay in the directory on purpose: their counters and
histogram buckets are part of the worker's totals (removing them would make counters go
backwards), and every gauge here is ``mostrecent``, which a dead process's stale value
cannot win. The directory is removed when the worker stops.

Examples:
    >>> app.conf.reliable_metrics_port = 9808
    $ curl -s localhost:9808/metrics | grep celery_reliable_tasks_total
    $ curl -si localhost:9808/readyz
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from celery import bootsteps
from celery.platforms import EX_FAILURE

from ..core import instruments
from ..core.extensions import ORDER_METRICS, Outcome
from ..core.state import add_extension, settings_of
from ..task import PUBLISHED_HEADER
from .http import MetricsServer, serve

logger = logging.getLogger(__name__)

#: Environment variable that puts prometheus_client in multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between the event loop's liveness stamps.
LOOP_TICK_INTERVAL = 1.0
#: ``/healthz`` fails when the event loop has not stamped for this many seconds.
LOOP_STALL_SECONDS = 30.0

#: ``Deferred.reason`` prefixes -> ``deferrals_total`` cause.
_CAUSES = (("rate limit", "rate_limit"), ("breaker", "breaker"), ("ordering", "ordering"))


def deferral_cause(exc: BaseException | None) -> str | None:
    """The bounded cause of a deferral (None for one that is not counted: a stale copy)."""
    cause = getattr(exc, "cause", None)
    if cause in instruments.DEFERRAL_CAUSES:
        return str(cause)
    reason = str(getattr(exc, "reason", "") or "")
    for prefix, name in _CAUSES:
        if reason.startswith(prefix):
            return name
    return None


class MetricsExtension:
    """Times and counts every ReliableTask run (no Redis round trip).

    It runs first (``ORDER_METRICS``), so it also sees the runs another extension defers.
    """

    name = "metrics"
    order = ORDER_METRICS

    def applies(self, task: Any) -> bool:
        return instruments.enabled()

    def before_start(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task.request._reliable_started = (time.time(), time.perf_counter())

    def after_return(self, task: Any, outcome: Outcome) -> None:
        instruments.task_outcome(task.name, outcome.kind)
        if outcome.kind == "deferred":
            cause = deferral_cause(outcome.exc)
            if cause is not None:
                instruments.deferred(task.name, cause)
            return
        started = getattr(task.request, "_reliable_started", None)
        if started is None or outcome.kind == "ignored":
            return
        wall, perf = started
        published = (task.request.headers or {}).get(PUBLISHED_HEADER)
        delay = None
        if isinstance(published, (int, float)) and not isinstance(published, bool):
            delay = wall - float(published)
        instruments.task_ran(task.name, time.perf_counter() - perf, delay)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: multiprocess metrics directory before the fork, HTTP server at start."""

    label = "reliable-metrics"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        settings = settings_of(worker.app)
        self.port = settings.metrics_port
        self.address = settings.metrics_address
        self.worker_timeout = settings.worker_timeout
        self.owned_dir: str | None = None
        self.server: MetricsServer | None = None
        self.timer_entry: Any = None
        self.worker: Any = None
        self.last_tick = time.monotonic()
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
        instruments.enable()

    def include_if(self, worker: Any) -> bool:
        return self.port is not None

    def start(self, worker: Any) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        assert self.port is not None
        self.worker = worker
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        instruments.prepare()
        self.last_tick = time.monotonic()
        if worker.timer is not None:
            self.timer_entry = worker.timer.call_repeatedly(LOOP_TICK_INTERVAL, self.tick)
        try:
            self.server = serve(self.port, registry, self.healthz, self.readyz, host=self.address)
        except OSError as exc:  # the port is taken, or the address is not this host's
            logger.critical(
                "celery_reliable: reliable_metrics_port: cannot listen on %s port %s: %s",
                self.address,
                self.port,
                exc.strerror or exc,
            )
            raise SystemExit(EX_FAILURE) from None
        logger.info(
            "celery_reliable: serving /metrics, /healthz and /readyz on %s port %s",
            self.address,
            self.port,
        )

    def tick(self) -> None:
        """Run by the event loop's timer: the loop turns."""
        self.last_tick = time.monotonic()

    def healthz(self) -> tuple[bool, str]:
        """200 while the event loop turns."""
        stalled = time.monotonic() - self.last_tick
        if stalled > LOOP_STALL_SECONDS:
            return False, f"event loop stalled for {stalled:.1f}s"
        return True, "ok"

    def readyz(self) -> tuple[bool, str]:
        """200 while consuming, registered in the store and not draining."""
        if instruments.draining():
            return False, "draining"
        if not instruments.registered(self.worker_timeout):
            return False, "not registered in the store (heartbeat failing or not yet sent)"
        if not consuming(self.worker):
            return False, "not consuming"
        return True, "ok"

    def stop(self, worker: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None


def consuming(worker: Any) -> bool:
    """True when the worker's consumer runs and has its task consumer and connection."""
    consumer = getattr(worker, "consumer", None)
    blueprint = getattr(consumer, "blueprint", None)
    return (
        blueprint is not None
        and blueprint.state == bootsteps.RUN
        and getattr(consumer, "task_consumer", None) is not None
        and getattr(consumer, "connection", None) is not None
    )


def install(app: Any) -> None:
    """Add the metrics step and the per-task instruments to ``app``."""
    app.steps["worker"].add(MetricsStep)
    add_extension(app, MetricsExtension())
