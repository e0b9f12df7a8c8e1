"""Orphans: a worker registry with heartbeats, the in-flight ledger, and the reaper that
recovers the tasks of dead workers (see docs/orphans.md and docs/reaper.md).

Examples:
    >>> celery_reliable.install(app)          # installs this feature among the others
    $ celery -A shop reliable-reaper
"""

from __future__ import annotations

from typing import Any

from ..core.state import add_extension
from .ackguard import AckGuardStep
from .fetch import FetchStep
from .ledger import LedgerExtension
from .registry import live_workers, reaper_stats
from .worker import RegistryStep

__all__ = ["install", "live_workers", "reaper_stats"]


def install(app: Any) -> None:
    """Register the worker step, reliable fetch, the ack guard and the in-flight ledger
    on ``app``."""
    app.steps["worker"].add(RegistryStep)
    app.steps["consumer"].add(FetchStep)
    app.steps["consumer"].add(AckGuardStep)
    add_extension(app, LedgerExtension(app))
