"""Ordering, worker side: revoked/expired tasks give up their place, and a periodic sweep
redoes lost hand-offs and skips sequence numbers that never arrived.

- ``task_revoked`` (worker MainProcess, only for revoked or expired tasks, which never
  reach the body): ``ord_cancel.lua`` advances the key past them, now or when their turn
  comes, and the next parked task is re-published.
- :class:`SweepStep` (a worker bootstep): a daemon thread in the MainProcess runs
  :func:`sweep_once` every ``reliable_reaper_interval`` seconds. Every worker sweeps; the
  scripts are atomic and a re-publish is recorded in Redis, so two sweepers do not both
  re-publish, and a duplicate message would be dropped at start anyway.

Examples:
    >>> from celery_reliable.ordering.sweep import sweep_once
    >>> sweep_once(app)
    SweepReport(keys=20, republished=0, skipped=0, idle=3)
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps
from celery.signals import task_revoked

from ..core.state import settings_of
from ..core.store import RedisStore, store_for
from .extension import (
    HEADER,
    STATE_TTL_MS,
    Place,
    count,
    index_key,
    key_names,
    republish,
    validate_tasks,
)
from .scripts import ORD_CANCEL, ORD_SWEEP, ORD_UNINDEX

logger = logging.getLogger(__name__)

#: Most keys examined per sweep pass (oldest activity first).
SWEEP_BATCH = 1000
#: A handed-off task that has not started after this many seconds is re-published
#: (``reliable_ordering_gap_timeout`` when that is shorter).
HANDOFF_TIMEOUT = 10.0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep pass did."""

    keys: int
    republished: int
    skipped: int
    idle: int


def sweep_once(
    app: Any, gap_timeout: float | None = None, handoff_timeout: float | None = None
) -> SweepReport:
    """One pass over the ordering keys: re-publish lost hand-offs, skip expired gaps.

    Parameters:
      app: the Celery app.
      gap_timeout: seconds a missing sequence number is waited for (default
        ``reliable_ordering_gap_timeout``).
      handoff_timeout: seconds a handed-off task may take to start before it is
        re-published (default the smaller of :data:`HANDOFF_TIMEOUT` and the gap timeout).
    """
    settings = settings_of(app)
    gap = settings.ordering_gap_timeout if gap_timeout is None else gap_timeout
    handoff = min(HANDOFF_TIMEOUT, gap) if handoff_timeout is None else handoff_timeout
    store = store_for(app)
    client = store.client
    index = index_key(store)
    members: list[tuple[str, float]] = list(
        client.zrange(index, 0, SWEEP_BATCH - 1, withscores=True)  # type: ignore[arg-type]
    )
    if not members:
        return SweepReport(0, 0, 0, 0)
    batch = store.pipeline()
    for member, _ in members:
        group, key = json.loads(member)
        batch.run(ORD_SWEEP, key_names(store, group, key), [int(gap * 1000), int(handoff * 1000)])
    replies = batch.execute()
    republished = skipped = 0
    idle_members = [
        (member, score)
        for (member, score), reply in zip(members, replies, strict=True)
        if reply[0] == "idle"
    ]
    idle = _unindex(store, index, idle_members)
    for (member, _), reply in zip(members, replies, strict=True):
        verdict = reply[0]
        if verdict == "republish":
            republish(app, reply[1])
            republished += 1
        elif verdict == "skipped":
            skipped += 1
            group, key = json.loads(member)
            logger.warning(
                "ordering: key %r of group %r skipped #%s: it did not arrive within "
                "reliable_ordering_gap_timeout=%ss (published but never sent, or its "
                "holder died and was not redelivered)",
                key,
                group,
                reply[1],
                gap,
            )
            if reply[2]:
                republish(app, reply[2])
                republished += 1
    if skipped:
        count(store, "skipped", skipped)
    if republished:
        count(store, "republished", republished)
    return SweepReport(len(members), republished, skipped, idle)


def _unindex(store: RedisStore, index: str, members: list[tuple[str, float]]) -> int:
    """Drop idle keys from the index, all in one round trip; how many were dropped."""
    if not members:
        return 0
    batch = store.pipeline()
    for member, score in members:
        batch.run(ORD_UNINDEX, [index], [member, str(int(score))])
    return sum(int(n) for n in batch.execute())


def on_task_revoked(app: Any, request: Any, terminated: bool) -> None:
    """Give up the place of a revoked or expired task (runs in the worker MainProcess)."""
    place = Place.from_header((getattr(request, "headers", None) or {}).get(HEADER))
    if place is None:
        return
    store = store_for(app)
    reply = store.run(
        ORD_CANCEL,
        key_names(store, place.group, place.key),
        [place.seq, "1" if terminated else "0", STATE_TTL_MS],
    )
    count(store, "cancelled")
    logger.info(
        "ordering: revoked/expired %s (%s #%s): %s", place.task_id, place.key, place.seq, reply[0]
    )
    if reply[0] == "next":
        republish(app, reply[1])


class SweepStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: validate ordering options at start and run the sweep thread."""

    label = "reliable-ordering-sweep"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        validate_tasks(worker.app)
        self.app = worker.app
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        self._thread = threading.Thread(
            target=self._run, name="reliable-ordering-sweep", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = settings_of(self.app).reaper_interval
        while not self._stop.wait(interval):
            try:
                sweep_once(self.app)
            except redis.RedisError as exc:
                logger.warning("ordering: sweep could not reach Redis: %r", exc)
            except Exception:
                logger.exception("ordering: sweep failed")


def install_worker_side(app: Any) -> None:
    """Add the sweep step and the ``task_revoked`` receiver to ``app``."""
    app.steps["worker"].add(SweepStep)

    def revoked(
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        **_: Any,
    ) -> None:
        if getattr(sender, "app", None) is not app or request is None:
            return
        try:
            on_task_revoked(app, request, bool(terminated))
        except Exception:
            logger.exception("ordering: could not release the place of a revoked task")

    task_revoked.connect(revoked, weak=False)
    app._reliable_ordering_revoked = revoked
