"""The orphans feature's worker step: a unique worker id, the heartbeat, deregistration.

Examples:
    >>> app.steps["worker"].add(RegistryStep)      # done by install(app)
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps, signals

from ..core.broker import broker_is_redis
from ..core.state import settings_of
from ..errors import ConfigurationError
from .embedded import EmbeddedReaper
from .registry import Heartbeat, WorkerRegistry, check_store, new_worker_id, set_current

logger = logging.getLogger(__name__)


class RegistryStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: unique worker id (before the pool forks), heartbeat, deregistration.

    The worker consumes only once it is registered: with the store unreachable, the step's
    start retries (with backoff, logging how long it has waited) before the consumer
    starts; a store that answers but cannot serve stops the worker at once, with one line
    naming ``reliable_redis_url`` (exit code 1).

    A warm shutdown deregisters on ``worker_shutdown``, sent after the pool has finished
    its running tasks, so a worker that is still draining keeps its registration (and is
    recovered if it is killed meanwhile).
    """

    label = "reliable-registry"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.worker_id = new_worker_id()
        set_current(self.worker_id, None)
        self.heart: Heartbeat | None = None

    def create(self, w: Any) -> Heartbeat:
        settings = settings_of(w.app)
        registry = WorkerRegistry(w.app, self.worker_id, w.hostname)
        try:
            check_store(registry.store)
        except ConfigurationError as exc:  # a wrong password, not Redis: stop, one line
            raise SystemExit(f"celery_reliable: {exc}") from None
        companions: list[Any] = []
        if settings.embedded_reaper:
            companions.append(EmbeddedReaper(w.app, self.worker_id))
        self.heart = Heartbeat(
            registry,
            settings.heartbeat_interval,
            settings.worker_timeout,
            broker_is_redis(w.app),
            companions,
        )
        heart = self.heart
        set_current(self.worker_id, heart)

        def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
            if sender is w:
                heart.shutdown()

        signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
        logger.info("celery_reliable: worker id %s (%s)", self.worker_id, w.hostname)
        return heart
