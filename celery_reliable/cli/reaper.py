"""``celery -A APP reliable-reaper [--interval S] [--once]``: run the orphan reaper.

Registered as its own Celery sub-command (``celery.commands`` entry point). Imported by
every ``celery`` invocation, so the reaper itself is imported only when the command runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption

from ..orphans.reaper import Reaper
from .group import app_of, emit_json

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
    "--loglevel",
    "-l",
    default="INFO",
    cls=CeleryOption,
    help_group="Reaper Options",
    help="Logging level.",
)
@click.pass_context
def reliable_reaper(
    ctx: click.Context, interval: float | None, once: bool, loglevel: str, **kwargs: Any
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
        logging.getLogger(__name__).info(
            "reaper: started (every %.2fs; workers dead after %.2fs without heartbeat)",
            every,
            reaper.settings.worker_timeout,
        )
        reaper.run_forever(every, stop)
    finally:
        reaper.close()
