"""The embedded reaper: reaper passes inside the workers, one leader at a time.

With ``reliable_embedded_reaper = True`` every worker's MainProcess runs a small thread
that competes for a lease in Redis (``<prefix>:{reaper}:leader``, taken with SET NX PX and
kept by renewing it every ``reliable_reaper_interval``). The holder runs
:meth:`celery_reliable.orphans.reaper.Reaper.run_pass`; the others only try for the lease. The
lease lasts ``reliable_worker_timeout`` seconds, so when the leader dies another worker
takes over about when the dead leader's own tasks become recoverable. Two leaders at once
(a paused leader whose lease expired) are harmless: claiming a dead worker is atomic.

Trade-off (see docs/reaper.md): no extra process to deploy, but recovery needs at least one
live worker of the app, and the leader's MainProcess (the consumer) spends the pass's few
Redis round trips per interval, plus the recovery work when a worker dies.

Examples:
    >>> app.conf.reliable_embedded_reaper = True   # or CELERY_RELIABLE_EMBEDDED_REAPER=1
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..core.state import settings_of
from ..core.store import store_for
from .reaper import Reaper
from .registry import RegistryKeys
from .scripts import LEADER

logger = logging.getLogger(__name__)


class EmbeddedReaper:
    """A leader-elected reaper thread in one worker's MainProcess.

    Parameters:
      app: the worker's app.
      worker_id: the worker's unique id (the lease holder's name).
    """

    def __init__(self, app: Any, worker_id: str) -> None:
        self.app = app
        self.worker_id = worker_id
        self.settings = settings_of(app)
        self.store = store_for(app)
        self.key = RegistryKeys(self.store)._k("leader")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leader = False

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="reliable-embedded-reaper", daemon=True
        )
        self._thread.start()

    def _lease(self, milliseconds: int) -> bool:
        return bool(self.store.run(LEADER, keys=[self.key], args=[self.worker_id, milliseconds]))

    def _run(self) -> None:
        reaper = Reaper(self.app)
        lease_ms = int(self.settings.worker_timeout * 1000)
        interval = self.settings.reaper_interval
        try:
            while not self._stop.is_set():
                try:
                    leader = self._lease(lease_ms)
                    if leader != self.leader:
                        logger.warning(
                            "celery_reliable: worker %s %s the embedded reaper",
                            self.worker_id,
                            "now runs" if leader else "no longer runs",
                        )
                    self.leader = leader
                    if leader:
                        started = time.monotonic()
                        result = reaper.run_pass()
                        reaper.note_pass(time.monotonic() - started, result)
                except Exception:
                    logger.exception("celery_reliable: embedded reaper pass failed")
                    reaper.close()
                self._stop.wait(interval)
        finally:
            reaper.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.reaper_interval + 5)
        try:
            self._lease(0)
        except Exception:
            logger.debug("could not release the embedded reaper lease", exc_info=True)
