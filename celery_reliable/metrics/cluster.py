"""The reaper's metrics: the cluster-wide view, read from the store once per pass.

``celery -A APP reliable-reaper --metrics-port N`` (or ``reliable_reaper_metrics_port``)
serves on ``N``:

- ``/metrics``, the gauges of the last :class:`ClusterView` (read after each pass, from
  the store's indexes, never by SCAN) and the reaper's own pass timings:
  ``celery_reliable_workers``, ``_in_flight``, ``_dead_letters{reason}``,
  ``_orphans_recovered_total{action}``, ``_ordering_parked``, ``_ordering_blocked_keys``,
  ``_breaker_state{breaker}``, ``_rate_limit_tokens{bucket}``, ``_reaper_pass_seconds``
  (histogram) and ``_reaper_last_pass_timestamp_seconds``;
- ``/healthz``: 200 while passes are attempted (the loop is not stuck);
- ``/readyz``: 200 while the last pass succeeded within three intervals.

Two reapers export the same cluster gauges; aggregate them with ``max`` (the alert rules
and the dashboard in deploy/ do).

Examples:
    >>> exporter = ReaperExporter(9809, interval=2.0)
    >>> exporter.record_pass(0.004, True, view)   # after each pass
    >>> exporter.close()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.config import DEFAULT_METRICS_ADDRESS
from .http import MetricsServer, serve

#: Histogram buckets (seconds) of ``reaper_pass_seconds``.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: ``/readyz`` fails when the last successful pass is older than this many intervals.
READY_INTERVALS = 3.0
#: ``/healthz`` fails when no pass was attempted for this many intervals (and 30 s).
STALL_INTERVALS = 10.0


@dataclass
class ClusterView:
    """The cluster-wide state one reaper pass read from the store.

    Parameters:
      workers: live registered workers.
      in_flight: tasks in flight over every registered worker: received and not
        acknowledged on the Redis broker with reliable fetch (the fetch records), started
        and not ended elsewhere (the ledgers).
      dead_letters: stored dead letters by reason.
      recovered: cluster counters of orphan recoveries by action.
      ordering_parked: tasks parked waiting for their turn.
      ordering_blocked_keys: ordering keys whose head has waited longer than the threshold.
      breakers: breaker name -> state (``closed``, ``half-open``, ``open``).
      buckets: bucket name -> tokens left (buckets named by a task's option).
    """

    workers: int = 0
    in_flight: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    recovered: dict[str, int] = field(default_factory=dict)
    ordering_parked: int = 0
    ordering_blocked_keys: int = 0
    breakers: dict[str, str] = field(default_factory=dict)
    buckets: dict[str, float] = field(default_factory=dict)


class _Collector:
    """Yields the families of the exporter's current view (no store access at scrape)."""

    def __init__(self, exporter: ReaperExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from ..core.instruments import BREAKER_STATE_VALUES, NAMESPACE

        def name(base: str) -> str:
            return f"{NAMESPACE}_{base}"

        with self.exporter.lock:
            view = self.exporter.view
            counts = list(self.exporter.pass_counts)
            total = self.exporter.pass_sum
            last = self.exporter.last_pass_at
        if view is not None:
            yield GaugeMetricFamily(name("workers"), "Live registered workers", value=view.workers)
            yield GaugeMetricFamily(
                name("in_flight"), "Tasks in flight on registered workers", value=view.in_flight
            )
            g = GaugeMetricFamily(
                name("dead_letters"), "Dead letters stored, by reason", labels=["reason"]
            )
            for reason, n in sorted(view.dead_letters.items()):
                g.add_metric([reason], n)
            yield g
            c = CounterMetricFamily(
                name("orphans_recovered"),
                "Messages of dead workers recovered, by action (cluster-wide)",
                labels=["action"],
            )
            for action, n in sorted(view.recovered.items()):
                c.add_metric([action], n)
            yield c
            yield GaugeMetricFamily(
                name("ordering_parked"), "Tasks parked for their turn", value=view.ordering_parked
            )
            yield GaugeMetricFamily(
                name("ordering_blocked_keys"),
                "Ordering keys whose head has waited longer than the threshold",
                value=view.ordering_blocked_keys,
            )
            g = GaugeMetricFamily(
                name("breaker_state"),
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                labels=["breaker"],
            )
            for breaker, state in sorted(view.breakers.items()):
                g.add_metric([breaker], BREAKER_STATE_VALUES.get(state, 0))
            yield g
            g = GaugeMetricFamily(
                name("rate_limit_tokens"), "Tokens left in a rate-limit bucket", labels=["bucket"]
            )
            for bucket, tokens in sorted(view.buckets.items()):
                g.add_metric([bucket], tokens)
            yield g
        cumulative, buckets = 0, []
        for bound, n in zip((*PASS_BUCKETS, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            name("reaper_pass_seconds"),
            "Duration of reaper passes",
            buckets=buckets,
            sum_value=total,
        )
        if last is not None:
            yield GaugeMetricFamily(
                name("reaper_last_pass_timestamp_seconds"),
                "Unix time of the end of the last successful reaper pass",
                value=last,
            )


class ReaperExporter:
    """Serves the reaper's metrics and health on ``port``.

    Parameters:
      port: TCP port (0: any free port; see :attr:`port`).
      interval: seconds between the reaper's passes (for the health thresholds).
      address: the address to listen on.

    Raises:
        OSError: ``address:port`` cannot be listened on.
    """

    def __init__(self, port: int, interval: float, address: str = DEFAULT_METRICS_ADDRESS) -> None:
        from prometheus_client import CollectorRegistry

        self.interval = interval
        self.lock = threading.Lock()
        self.view: ClusterView | None = None
        self.pass_counts = [0] * (len(PASS_BUCKETS) + 1)
        self.pass_sum = 0.0
        self.passes = 0
        self.last_pass_at: float | None = None
        self.last_attempt = time.monotonic()
        self.last_ok: float | None = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))  # type: ignore[arg-type]
        self.server: MetricsServer | None = serve(
            port, registry, self.healthz, self.readyz, host=address
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def record_pass(self, seconds: float, ok: bool, view: ClusterView | None) -> None:
        """A pass ended (``ok``: it succeeded); ``view`` is the cluster's state read after
        it (None when it could not be read: the last one is served on)."""
        now = time.monotonic()
        with self.lock:
            self.last_attempt = now
            if view is not None:
                self.view = view
            if not ok:
                return
            index = next(
                (i for i, bound in enumerate(PASS_BUCKETS) if seconds <= bound), len(PASS_BUCKETS)
            )
            self.pass_counts[index] += 1
            self.pass_sum += seconds
            self.passes += 1
            self.last_pass_at = time.time()
            self.last_ok = now

    def healthz(self) -> tuple[bool, str]:
        silent = time.monotonic() - self.last_attempt
        if silent > max(30.0, STALL_INTERVALS * self.interval):
            return False, f"no pass attempted for {silent:.1f}s"
        return True, "ok"

    def readyz(self) -> tuple[bool, str]:
        if self.last_ok is None:
            return False, "no successful pass yet"
        age = time.monotonic() - self.last_ok
        if age > READY_INTERVALS * self.interval + 1.0:
            return False, f"last successful pass {age:.1f}s ago"
        return True, "ok"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
