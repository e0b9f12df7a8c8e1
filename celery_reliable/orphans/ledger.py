"""In-flight ledger: which worker runs which ReliableTask, so a reaper can recover it.

On a worker that receives with reliable fetch (Redis broker, ``reliable_fetch``), the
worker's fetch record already is the in-flight record (:mod:`celery_reliable.orphans.fetch`):
written with the pop, removed with kombu's ack. There the ledger writes nothing for a
message delivered for the first time (no store round trip at all), and the reaper counts a
recovery for a dead worker's first-time ReliableTask entries it cannot prove unstarted
(:mod:`celery_reliable.orphans.reaper`). A message kombu restored before
(``delivery_info['redelivered']``: a recovery, a requeue, a shutdown restore) is recorded
here as everywhere else, so from its second delivery on its start is known exactly and its
recovery count is checked at start.

Elsewhere (RabbitMQ, ``reliable_fetch = False``) a :class:`LedgerExtension` runs in the
pool process around every ReliableTask. At start it
writes ``task id -> {delivery tag, task, exchange, routing key, start time}`` into the
ledger of the worker (``<prefix>:{reaper}:ledger:<worker id>``) and reads the task's
recovery count (``ledger_start.lua``); at the end it removes the entry (``ledger_end.lua``).
Both scripts ride in the task's one store round trip of each phase, with the other
features' scripts (:mod:`celery_reliable.core.chain`). A task
orphaned ``reliable_max_recoveries`` times is dead-lettered (reason
``orphaned``) instead of run: on the Redis broker the reaper does that itself, but on
RabbitMQ the broker redelivers a dead consumer's messages on its own, so this check is how
a task that kills its worker every time ends there.

If the end script finds the entry gone, a reaper declared the worker dead while the task
ran (a long pause, a partition): the task was given back to the broker and probably ran a
second time. That is logged as a warning and counted (``duplicates`` in the status).

Examples:
    >>> add_extension(app, LedgerExtension(app))      # done by install(app)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from celery.exceptions import Ignore, Reject

from ..core import instruments
from ..core.chain import ScriptCall, run_chain
from ..core.extensions import ORDER_LEDGER, Outcome
from ..core.state import settings_of
from ..core.store import STORE_ERRORS, store_for
from ..task import ReliableTask
from .registry import RegistryKeys, current_worker_id, worker_fetches
from .scripts import LEDGER_END, LEDGER_START

logger = logging.getLogger(__name__)

#: Outcomes after which the task is over for good (its recovery count is forgotten).
TERMINAL_OUTCOMES = ("succeeded", "failed")
#: Attribute of ``task.request`` naming the worker id the run was recorded under.
_RECORDED_ATTR = "_reliable_ledger_worker"


class RecoveredTooOften(Ignore):
    """The task was orphaned ``reliable_max_recoveries`` times: it was
    dead-lettered (reason ``orphaned``) instead of run, and its message is acknowledged."""

    def __init__(self, task_id: str, recoveries: int, limit: int) -> None:
        self.task_id = task_id
        self.recoveries = recoveries
        self.limit = limit
        super().__init__(
            f"task {task_id} was orphaned {recoveries} times "
            f"(reliable_max_recoveries={limit}): its worker died each time it ran"
        )


class LedgerExtension:
    """Record each ReliableTask run in its worker's ledger; dead-letter poison tasks.

    Parameters:
      app: the Celery app.
    """

    name = "ledger"
    order = ORDER_LEDGER

    def __init__(self, app: Any) -> None:
        self.app = app

    def applies(self, task: ReliableTask) -> bool:
        return True

    def start_calls(
        self, task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Sequence[ScriptCall]:
        worker_id = current_worker_id()
        if worker_id is None:  # not inside a worker that runs the registry step
            return ()
        request = task.request
        info = request.delivery_info or {}
        if worker_fetches() and not info.get("redelivered"):
            return ()  # its worker's fetch record is its in-flight record
        keys = RegistryKeys(store_for(self.app))
        properties = request.properties or {}
        entry = {
            "tag": properties.get("delivery_tag"),
            "task": task.name,
            "exchange": info.get("exchange"),
            "routing_key": info.get("routing_key"),
            "t": time.time(),
            "pid": os.getpid(),
        }
        setattr(request, _RECORDED_ATTR, worker_id)
        return (
            ScriptCall(
                LEDGER_START,
                [keys.ledger(worker_id), keys.workers, keys.recoveries(request.id)],
                [worker_id, request.id, json.dumps(entry)],
            ),
        )

    def started(
        self,
        task: ReliableTask,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        replies: Sequence[Any],
    ) -> None:
        if not replies:
            return
        request = task.request
        (reply,) = replies
        if isinstance(reply, Exception):  # the store error that stopped the phase
            instruments.store_error("ledger")
            setattr(request, _RECORDED_ATTR, None)
            logger.warning(
                "celery_reliable: could not record %s[%s] in the in-flight ledger (%r); it runs"
                " unrecorded (recovered only by the broker's visibility timeout if lost)",
                task.name,
                request.id,
                reply,
            )
            return
        recoveries = int(reply)
        limit = settings_of(self.app).max_recoveries
        if recoveries and recoveries >= limit:
            self._give_up(task, recoveries, limit)

    def _give_up(self, task: ReliableTask, recoveries: int, limit: int) -> None:
        exc = RecoveredTooOften(task.request.id, recoveries, limit)
        if task.dead_letter:
            try:
                task.record_dead_letter(task.dead_letter_entry(exc, "orphaned", None), exc)
            except Reject:
                self._remove(task, terminal=False)
                raise
        else:
            logger.error("%s; dead_letter=False, so it is dropped", exc)
        self._remove(task, terminal=True)
        raise exc

    def end_calls(self, task: ReliableTask, outcome: Outcome) -> Sequence[ScriptCall]:
        call = self._end_call(task, terminal=outcome.kind in TERMINAL_OUTCOMES)
        return () if call is None else (call,)

    def ended(self, task: ReliableTask, outcome: Outcome, replies: Sequence[Any]) -> None:
        for reply in replies:
            self._removed(task, reply)

    def _end_call(self, task: ReliableTask, terminal: bool) -> ScriptCall | None:
        request = task.request
        worker_id = getattr(request, _RECORDED_ATTR, None)
        if worker_id is None:
            return None
        keys = RegistryKeys(store_for(self.app))
        # With reliable fetch the ack guard counts every late finish (ledger or not).
        counts = "0" if worker_fetches() else "1"
        return ScriptCall(
            LEDGER_END,
            [keys.ledger(worker_id), keys.recoveries(request.id), keys.stats],
            [request.id, "1" if terminal else "0", counts],
        )

    def _remove(self, task: ReliableTask, terminal: bool) -> None:
        """Take the run out of the ledger now (a round trip of its own: rare paths only)."""
        call = self._end_call(task, terminal)
        if call is None:
            return
        try:
            (reply,) = run_chain(store_for(self.app), [call])
        except STORE_ERRORS as exc:
            reply = exc
        self._removed(task, reply)

    def _removed(self, task: ReliableTask, reply: Any) -> None:
        request = task.request
        worker_id = getattr(request, _RECORDED_ATTR, None)
        setattr(request, _RECORDED_ATTR, None)
        if isinstance(reply, Exception):  # the store error that stopped the phase
            instruments.store_error("ledger")
            logger.warning(
                "celery_reliable: could not remove %s[%s] from the in-flight ledger (%r); if"
                " this worker dies before its next clean deregistration a reaper may give the"
                " (already acknowledged) message back, which is then a no-op",
                task.name,
                request.id,
                reply,
            )
            return
        if not int(reply) and not worker_fetches():
            logger.warning(
                "celery_reliable: %s[%s] finished on worker %s after a reaper had declared the"
                " worker dead and recovered the task: it has probably run twice",
                task.name,
                request.id,
                worker_id,
            )
