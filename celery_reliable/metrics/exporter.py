"""Serves the worker's Prometheus metrics, aggregated across its prefork processes.

Turned on by ``reliable_metrics_port``: the worker's main process then serves
``http://<host>:<port>/metrics`` with the sum over itself and every pool process, using
prometheus-client's multiprocess mode. The mode is chosen when prometheus_client is first
imported, so :class:`MetricsStep` sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per
worker instance, unless you set one) before anything imports it, and before the pool forks.

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
from typing import Any

from celery import bootsteps

from ..core import instruments
from ..core.extensions import ORDER_METRICS, Outcome
from ..core.state import add_extension, settings_of

logger = logging.getLogger(__name__)

#: Environment variable that puts prometheus_client in multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds between sweeps that drop the live gauges of pool processes that died.
DEAD_PROCESS_SWEEP_INTERVAL = 30.0


class MetricsExtension:
    """Counts every ReliableTask run by outcome (no Redis round trip)."""

    name = "metrics"
    order = ORDER_METRICS

    def applies(self, task: Any) -> bool:
        return instruments.enabled()

    def before_start(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        return None

    def after_return(self, task: Any, outcome: Outcome) -> None:
        instruments.task_outcome(task.name, outcome.kind)


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
        instruments.enable()

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


def install(app: Any) -> None:
    """Add the metrics step and the per-task outcome counter to ``app``."""
    app.steps["worker"].add(MetricsStep)
    add_extension(app, MetricsExtension())
