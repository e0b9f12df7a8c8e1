"""The points where reliability features hook into a ReliableTask's life.

Each feature (ordering, admission control, the in-flight ledger...) is a
:class:`TaskExtension` registered by :func:`celery_reliable.install`. ReliableTask calls, in
the pool process that runs the task:

- ``before_start(task, args, kwargs)`` in ``order``, before the body. Raising
  :class:`Deferred` means "do not run it now": the extension has already arranged for the
  task to come back (the message is then acknowledged, no retry is counted, no result is
  stored); extensions that already started get ``after_return`` with kind ``deferred``,
  the others get nothing.
- ``after_return(task, outcome)`` in reverse order, after the body and after the dead-letter
  write, before the message is acknowledged.

Extensions must decide cheaply per task (``applies``) so tasks that use no feature pay
nothing.

An extension that works in the coordination store implements :class:`StoreExtension`
instead: it returns its script calls (``start_calls``, ``end_calls``) and gets their replies
(``started``, ``ended``) at the same points. ReliableTask runs the calls of every such
extension of a phase as ONE script (:func:`~celery_reliable.core.chain.run_chain`), so a
task makes at most one round trip to the store at start and one at the end, whatever
features it uses. A start call marked ``gate`` that does not answer ``['run', ...]`` ends
the chain: the extensions after it get no ``started`` and no ``ended``. When the store
cannot be reached, each extension's replies are the ``redis.RedisError`` itself, and its
``started``/``ended`` applies its own policy (requeue, run unrecorded, fail open...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from celery.exceptions import Ignore

if TYPE_CHECKING:
    from celery import Task as ReliableTask  # any Task; ReliableTask in practice

#: How a run ended: the body returned, asked to retry, failed for good (dead-lettered
#: when the task allows it), was ignored/rejected by the body itself (or cut short by
#: SystemExit), or never ran because an extension deferred it (``Deferred``).
OutcomeKind = Literal["succeeded", "retry", "failed", "ignored", "deferred"]

#: ``TaskExtension.order`` of the built-in features: lower runs ``before_start`` first
#: (and ``after_return`` last). Ordering decides the turn before admission control spends
#: a token, and the in-flight ledger is written only for runs that will really start.
ORDER_ORDERING = 10
ORDER_ADMISSION = 20
ORDER_LEDGER = 30
#: Metrics time and count runs; first, so that they also see the runs another extension
#: defers (``after_return`` runs in reverse order: metrics see the final outcome last).
ORDER_METRICS = 0


@dataclass(frozen=True)
class Outcome:
    """The end of one run of a task, passed to ``after_return``."""

    kind: OutcomeKind
    exc: BaseException | None = None
    dead_lettered: bool = False


class Deferred(Ignore):
    """Raised by an extension's ``before_start`` when the task must not run now.

    It is an :class:`celery.exceptions.Ignore`: Celery acknowledges the message and stores
    no state. The extension that raises it has already made the task come back (re-published
    it with a delay, parked it in Redis...), so nothing is lost.
    """

    def __init__(self, reason: str, delay: float | None = None) -> None:
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class TaskExtension(Protocol):
    """A reliability feature that acts around each run of a ReliableTask."""

    name: str
    #: Position among extensions (see ``ORDER_*``); lower runs ``before_start`` first.
    order: int

    def applies(self, task: ReliableTask) -> bool:
        """Whether this task uses the feature (called once per task class and process)."""
        ...

    def before_start(
        self, task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Run before the body; raise :class:`Deferred` to not run it now."""
        ...

    def after_return(self, task: ReliableTask, outcome: Outcome) -> None:
        """Run after the body (and the dead-letter write), before the ack."""
        ...


class LuaSource(Protocol):
    """A Lua script by name and text (:class:`celery_reliable.core.store.Lua`)."""

    @property
    def name(self) -> str: ...

    def source(self) -> str: ...


@dataclass(frozen=True)
class ScriptCall:
    """One script a :class:`StoreExtension` wants run, as a step of the task's one script
    of the phase (:func:`celery_reliable.core.chain.run_chain`).

    Parameters:
      lua: the script (a ``Lua`` of the feature's ``scripts.py``).
      keys: its KEYS.
      args: its ARGV.
      gate: end the phase's script after this step unless the reply is ``['run', ...]``.
    """

    lua: LuaSource
    keys: Sequence[str]
    args: Sequence[Any]
    gate: bool = False


class StoreExtension(Protocol):
    """A reliability feature whose per-task store work rides in the task's one round trip
    at start and one at the end (see the module's docstring)."""

    name: str
    #: Position among extensions (see ``ORDER_*``); lower runs first at start.
    order: int

    def applies(self, task: ReliableTask) -> bool:
        """Whether this task uses the feature (called once per task class and process)."""
        ...

    def start_calls(
        self, task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Sequence[ScriptCall]:
        """The scripts to run before the body (none: ``started`` gets no replies)."""
        ...

    def started(
        self,
        task: ReliableTask,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        replies: Sequence[Any],
    ) -> None:
        """Act on the replies (or the RedisError); raise :class:`Deferred` to not run now."""
        ...

    def end_calls(self, task: ReliableTask, outcome: Outcome) -> Sequence[ScriptCall]:
        """The scripts to run after the body (and the dead-letter write), before the ack."""
        ...

    def ended(self, task: ReliableTask, outcome: Outcome, replies: Sequence[Any]) -> None:
        """Act on the end replies (or the RedisError)."""
        ...


#: What ``add_extension`` accepts.
Extension = TaskExtension | StoreExtension
