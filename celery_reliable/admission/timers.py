"""The worker's event loop fires due timers without kombu's one-second pause.

Deferred tasks (rate limit, breaker) come back as ETA messages released by that timer, so
its pacing decides how closely a shared rate limit is met.

Examples:
    >>> app.steps["worker"].add(TimerPaceStep)     # done by install(app)
"""

from __future__ import annotations

import functools
from typing import Any

from celery import bootsteps


class TimerPaceStep(bootsteps.Step):  # type: ignore[misc]
    """Worker step: the event loop fires due timers without pausing for a second.

    Deferred tasks come back as ETA messages, released by the worker's event-loop timer.
    kombu's ``Hub.fire_timers`` runs at most 10 due entries per loop pass and, when it ran
    10, returns ``min_delay`` (1 s) as the next poll timeout although more are due; after
    any stall that lets 10 ETA copies fall due together, the worker then releases 10 per
    second (the same pause under-runs Celery's own ``rate_limit``). With ``min_delay=0`` the
    loop polls without blocking and fires the next batch at once; a non-empty schedule
    whose first entry is not due still sleeps exactly until it is.
    """

    label = "reliable-timer-pace"
    requires = ("celery.worker.components:Hub",)

    def create(self, worker: Any) -> None:
        hub = getattr(worker, "hub", None)
        if hub is not None and not isinstance(hub.fire_timers, functools.partial):
            hub.fire_timers = functools.partial(_fire_timers_paced, hub)


#: kombu's own poll timeout when no timer is scheduled at all.
IDLE_POLL_DELAY = 1.0


def _fire_timers_paced(hub: Any, **kwargs: Any) -> float:
    """``Hub.fire_timers`` with ``min_delay=0`` while entries are scheduled; with an empty
    schedule it returns kombu's idle delay, so an idle loop blocks instead of spinning."""
    delay = type(hub).fire_timers(hub, min_delay=0, **kwargs)
    if not delay and not (hub.timer and len(hub.timer)):
        return IDLE_POLL_DELAY
    return float(delay)
