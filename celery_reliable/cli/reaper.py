"""``celery -A APP reliable-reaper [--interval S] [--once] [--metrics-port N]``: run the
orphan reaper, and serve the cluster-wide metrics (``--metrics-port`` or
``reliable_reaper_metrics_port``).

Registered as its own Celery sub-command (``celery.commands`` entry point). Imported by
every ``celery`` invocation, so the reaper itself is imported only when the command runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption

from ..metrics.cluster import ReaperExporter
from ..orphans.reaper import Reaper
from ..status import cluster_view
from .group import app_of, clear_errors, emit_json

log = logging.getLogger(__name__)

#: Log line format of the reaper process.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/reaper] %(message)s"


@click.command(name="reliable-reaper", cls=CeleryCommand)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    cls=CeleryOption,
    help_group="Reaper Options",
    help="Seconds between passes (default: reliable_reaper_interval).",
)
@click.option(
    "--once",
    is_flag=True,
    cls=CeleryOption,
    help_group="Reaper Options",
    help="Run one pass, print what it did as JSON, and exit.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    cls=CeleryOption,
    help_group="Reaper Options",
    help="Serve the cluster-wide metrics, /healthz and /readyz on this port "
    "(default: reliable_reaper_metrics_port; off when neither is set).",
)
@click.option(
    "--loglevel",
    "-l",
    default="INFO",
    cls=CeleryOption,
    help_group="Reaper Options",
    help="Logging level.",
)
@click.pass_context
@clear_errors()
def reliable_reaper(
    ctx: click.Context,
    interval: float | None,
    once: bool,
    metrics_port: int | None,
    loglevel: str,
    **kwargs: Any,
) -> None:
    """Find workers whose heartbeat expired and recover their in-flight tasks."""
    app = app_of(ctx)
    app.loader.import_default_modules()
    logging.basicConfig(level=loglevel.upper(), format=LOG_FORMAT)
    reaper = Reaper(app)
    try:
        if once:
            result = reaper.run_pass()
            emit_json(
                {
                    "dead_workers": result.dead_workers,
                    "recoveries": [r.__dict__ for r in result.recoveries],
                }
            )
            return
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        every = interval or reaper.settings.reaper_interval
        port = metrics_port if metrics_port is not None else reaper.settings.reaper_metrics_port
        exporter = None
        on_pass = None
        if port is not None:
            address = reaper.settings.metrics_address
            try:
                exporter = ReaperExporter(port, every, address)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot listen on {address} port {port} (reliable_reaper_metrics_port, "
                    f"reliable_metrics_address): {exc.strerror or exc}"
                ) from None
            on_pass = _exporting(app, exporter)
            log.info(
                "reaper: serving cluster metrics, /healthz and /readyz on %s port %s",
                address,
                port,
            )
        log.info(
            "reaper: started (every %.2fs; workers dead after %.2fs without heartbeat)",
            every,
            reaper.settings.worker_timeout,
        )
        try:
            reaper.run_forever(every, stop, on_pass=on_pass)
        finally:
            if exporter is not None:
                exporter.close()
    finally:
        reaper.close()


def _exporting(app: Any, exporter: ReaperExporter) -> Callable[[float, Any], None]:
    """After each pass: read the cluster's state once and hand it to the exporter."""
    failing = [False]

    def on_pass(seconds: float, result: Any) -> None:
        view = None
        if result is not None:
            try:
                view = cluster_view(app)
                if failing[0]:
                    log.warning("reaper: reading the cluster metrics works again")
                failing[0] = False
            except Exception as exc:  # a Redis blip: keep serving the last view
                if not failing[0]:
                    log.error("reaper: could not read the cluster metrics (%r)", exc)
                failing[0] = True
        exporter.record_pass(seconds, result is not None, view)

    return on_pass
