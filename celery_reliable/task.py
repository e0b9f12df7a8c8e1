"""ReliableTask: the Task base class that turns the reliability features on.

Examples:
    >>> @app.task(base=ReliableTask, bind=True, max_retries=5, autoretry_for=(IOError,),
    ...           dead_letter_for=(ValueError,))
    ... def charge(self, account_id, amount): ...
"""

from __future__ import annotations

import difflib
import logging
import time
import traceback as tb_module
from typing import Any, ClassVar, cast

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from celery.utils.time import maybe_iso8601
from kombu.serialization import dumps

from .core import compat
from .core.chain import NOT_RUN, ScriptCall, run_chain
from .core.extensions import Deferred, Extension, Outcome, StoreExtension, TaskExtension
from .core.state import extensions_of, settings_of
from .core.store import STORE_ERRORS, store_for
from .deadletters import record
from .deadletters.record import DeadLetter
from .deadletters.store import WRITE_PATIENCE, DeadLetterStore
from .errors import ConfigurationError, PayloadTooLarge

logger = logging.getLogger(__name__)

#: Message header: the Unix time a task was published (or became due, with a countdown or
#: an ETA); ``celery_reliable_start_delay_seconds`` is measured from it.
PUBLISHED_HEADER = "x-reliable-published"


def _due_at(options: dict[str, Any]) -> float:
    """Unix time a publish with ``options`` is due: now, or its ``countdown``/``eta``."""
    now = time.time()
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and not isinstance(countdown, bool) and countdown > 0:
        return now + float(countdown)
    eta = options.get("eta")
    if isinstance(eta, str):
        eta = maybe_iso8601(eta)
    if eta is not None and hasattr(eta, "timestamp"):
        return max(now, float(eta.timestamp()))
    return now


def reason_text(reason: object) -> str:
    """A Reject reason as text: ``module.Class: message`` for an exception."""
    if isinstance(reason, BaseException):
        return f"{record.exception_name(reason)}: {reason}"
    return str(reason)


def requeue(reason: str, requeue: bool = True) -> Reject:
    """The Reject a pool process raises to hand its message back to the broker.

    The reason is a string: the Reject travels pickled to the worker's main process, where
    an exception object inside it might not unpickle (and would stop the worker).

    Examples:
        >>> raise requeue(f"store unreachable: {reason_text(exc)}") from None
    """
    return Reject(reason, requeue=requeue)


#: The options ReliableTask adds (each documented on the class).
RELIABLE_OPTIONS = (
    "dead_letter",
    "dead_letter_for",
    "ordering_key",
    "ordering_group",
    "global_rate_limit",
    "global_rate_burst",
    "global_rate_key",
    "breaker",
    "breaker_fail_max",
    "breaker_reset_timeout",
    "breaker_exclude",
    "breaker_probe_lease",
)
#: Task options Celery reads that are not attributes of its Task class.
CELERY_OPTIONS = (
    "autoretry_for",
    "dont_autoretry_for",
    "retry_kwargs",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "pydantic",
    "pydantic_strict",
    "pydantic_context",
    "pydantic_dump_kwargs",
)
#: A new class attribute starting with one of these and naming no option is a typo.
OPTION_PREFIXES = ("dead_letter", "ordering_", "global_rate", "breaker")
#: How close (difflib ratio) an unknown attribute must be to an option to be a typo.
TYPO_CUTOFF = 0.8


def check_options(cls: type) -> None:
    """Validate the options a task class sets (its own class attributes).

    Raises:
        ConfigurationError: naming the option, with the task in the message.
    """
    own = vars(cls)
    task = own.get("name") or cls.__qualname__
    inherited: set[str] = set()
    for base in cls.__mro__[1:]:
        inherited.update(vars(base))
    known = set(RELIABLE_OPTIONS) | set(CELERY_OPTIONS) | inherited
    for attr in own:
        if attr.startswith("_") or attr in known:
            continue
        close = difflib.get_close_matches(attr, sorted(known), n=1, cutoff=TYPO_CUTOFF)
        if close or attr.startswith(OPTION_PREFIXES):
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigurationError(attr, f"task {task!r}: unknown option (a typo?){hint}")
    if "dead_letter" in own and not isinstance(own["dead_letter"], bool):
        raise ConfigurationError(
            "dead_letter", f"task {task!r}: expected True or False, got {own['dead_letter']!r}"
        )
    for option in ("dead_letter_for", "breaker_exclude"):
        if option in own:
            _exception_types(option, own[option], task)


def _exception_types(option: str, value: Any, task: str) -> None:
    def is_exception(item: Any) -> bool:
        return isinstance(item, type) and issubclass(item, BaseException)

    if isinstance(value, tuple | list) and all(is_exception(item) for item in value):
        return
    example = f" (write ({value.__name__},))" if is_exception(value) else ""
    raise ConfigurationError(
        option, f"task {task!r}: expected a tuple of exception types, got {value!r}{example}"
    )


class ReliableTask(Task):  # type: ignore[misc]
    """A Celery Task that is hard to lose.

    Defaults to ``acks_late`` and ``reject_on_worker_lost``: the message is acknowledged
    only after the task ended. When it fails for good (retries exhausted, or an exception
    in ``dead_letter_for``) it is written to the dead-letter store before the ack.

    Parameters (task options, set in ``@app.task(...)``):
      dead_letter: store failed-for-good runs in the dead-letter store (default True).
      dead_letter_for: exception types that skip retries and are dead-lettered at once.
      ordering_key, ordering_group: per-key ordering (see docs/ordering.md).
      global_rate_limit, global_rate_burst, global_rate_key: a cluster-wide token bucket.
      breaker, breaker_fail_max, breaker_reset_timeout, breaker_exclude: a shared breaker.
    """

    abstract = True
    acks_late = True
    reject_on_worker_lost = True

    dead_letter: bool = True
    dead_letter_for: tuple[type[BaseException], ...] = ()
    ordering_key: Any = None
    ordering_group: str | None = None
    global_rate_limit: str | None = None
    global_rate_burst: int | None = None
    global_rate_key: Any = None
    breaker: str | None = None
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 30.0
    breaker_exclude: tuple[type[BaseException], ...] = ()

    #: Extensions in effect for this task class, resolved on first run in a process.
    _reliable_extensions: ClassVar[list[tuple[Extension, bool]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the options of every task class as it is defined (``@app.task(...)``
        creates one): a wrong type or an unknown name close to an option raises
        :class:`~celery_reliable.errors.ConfigurationError` naming the task and option."""
        super().__init_subclass__(**kwargs)
        check_options(cls)

    # --- publishing ---

    def apply_async(self, args: Any = None, kwargs: Any = None, *a: Any, **options: Any) -> Any:
        """Publish, refusing payloads over ``reliable_max_payload_bytes``.

        Raises:
            PayloadTooLarge: the serialized arguments are too large; nothing was sent.
        """
        if not self.app.conf.task_always_eager:
            serializer = options.get("serializer") or self.serializer
            # Size what Celery will send: a pydantic=True task's models are dumped first.
            sent_args, sent_kwargs = compat.dump_pydantic_arguments(self, args, kwargs, serializer)
            self.check_payload_size(sent_args, sent_kwargs, serializer)
            options["headers"] = self._published_header(options)
        return super().apply_async(args, kwargs, *a, **options)

    def _published_header(self, options: dict[str, Any]) -> dict[str, Any]:
        """The publish's headers with :data:`PUBLISHED_HEADER`: when the task is due (now,
        or its ``countdown``/``eta``). A copy that already carries it (a deferred or parked
        task sent again) keeps it, so the time it was held back counts as start delay; a
        retry is measured afresh from when it is due."""
        headers = dict(options.get("headers") or {})
        request = self.request
        retrying = (
            options.get("task_id") is not None
            and options.get("task_id") == request.id
            and int(options.get("retries") or 0) > int(request.retries or 0)
        )
        if PUBLISHED_HEADER not in headers or retrying:
            headers[PUBLISHED_HEADER] = _due_at(options)
        return headers

    def check_payload_size(self, args: Any, kwargs: Any, serializer: str | None = None) -> int:
        """Serialized size of ``(args, kwargs)``; raise PayloadTooLarge over the limit."""
        limit = settings_of(self.app).max_payload_bytes
        body: tuple[Any, ...] = (tuple(args or ()), dict(kwargs or {}), {})
        _, _, data = dumps(body, serializer=serializer or self.serializer)
        size = len(data)
        if size > limit:
            raise PayloadTooLarge(self.name, size, limit)
        return size

    # --- running ---

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)
        try:
            return self._run(*args, **kwargs)
        except Reject as exc:
            # Celery pickles the Reject and sends it to the worker's main process; an
            # exception object inside it may not unpickle there (redis-py's MovedError does
            # not), which kills the worker. Only a string crosses the process boundary.
            if exc.reason is None or isinstance(exc.reason, str):
                raise
            raise requeue(reason_text(exc.reason), requeue=bool(exc.requeue)) from None

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        started: list[Extension] = []
        try:
            self._start(args, kwargs, started)
        except Deferred as exc:
            self._finish(started, Outcome("deferred", exc))
            raise
        except (Ignore, Reject, Retry) as exc:  # an extension's verdict (drop, requeue...)
            self._finish(started, Outcome("failed", exc))
            raise
        except Exception as exc:
            self._finish(started, Outcome("failed", exc))
            self._dead_letter_start_failure(exc)
            raise
        except BaseException as exc:
            self._finish(started, Outcome("failed", exc))
            raise
        try:
            result = super().__call__(*args, **kwargs)
        except Retry as exc:
            self._finish(started, Outcome("retry", exc))
            raise
        except (Ignore, Reject) as exc:
            self._finish(started, Outcome("ignored", exc))
            raise
        except Exception as exc:
            try:
                dead_lettered = self._dead_letter_failure(exc)
            except Reject:
                self._finish(started, Outcome("ignored", exc))
                raise
            self._finish(started, Outcome("failed", exc, dead_lettered))
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: the run was cut short
            self._finish(started, Outcome("ignored", exc))
            raise
        self._finish(started, Outcome("succeeded"))
        return result

    def _extensions(self) -> list[tuple[Extension, bool]]:
        """``(extension, works in the store)`` for the extensions this task class uses."""
        cls = type(self)
        if cls.__dict__.get("_reliable_extensions") is None:
            cls._reliable_extensions = [
                (e, hasattr(e, "start_calls")) for e in extensions_of(self.app) if e.applies(self)
            ]
        return cls._reliable_extensions or []

    def _start(self, args: Any, kwargs: Any, started: list[Extension]) -> None:
        """Start every extension in order; the store extensions' calls are ONE round trip."""
        plan = self._extensions()
        calls: list[ScriptCall] = []
        spans: list[tuple[int, int]] = []
        for ext, in_store in plan:
            if in_store:
                mine = cast(StoreExtension, ext).start_calls(self, args, kwargs)
                spans.append((len(calls), len(calls) + len(mine)))
                calls.extend(mine)
        replies = self._run_calls(calls)
        spans.reverse()
        for ext, in_store in plan:
            if not in_store:
                cast(TaskExtension, ext).before_start(self, args, kwargs)
                started.append(ext)
                continue
            low, high = spans.pop()
            mine = replies[low:high]
            if any(r is NOT_RUN for r in mine):
                continue  # an earlier gate said no (and that extension did not raise)
            cast(StoreExtension, ext).started(self, args, kwargs, mine)
            started.append(ext)

    def _run_calls(self, calls: list[ScriptCall]) -> list[Any]:
        """The replies of ``calls`` (one round trip); each is the store error if it failed."""
        if not calls:
            return []
        try:
            return run_chain(store_for(self.app), calls)
        except STORE_ERRORS as exc:
            return [exc] * len(calls)

    def _finish(self, started: list[Extension], outcome: Outcome) -> None:
        ending = list(reversed(started))
        calls: list[ScriptCall] = []
        spans: list[tuple[int, int]] = []
        for ext in ending:
            if hasattr(ext, "end_calls"):
                try:
                    mine = cast(StoreExtension, ext).end_calls(self, outcome)
                except Exception:
                    self._log_hook_failure(ext, "end_calls")
                    mine = ()
                spans.append((len(calls), len(calls) + len(mine)))
                calls.extend(mine)
        replies = self._run_calls(calls)
        spans.reverse()
        for ext in ending:
            try:
                if hasattr(ext, "end_calls"):
                    low, high = spans.pop()
                    cast(StoreExtension, ext).ended(self, outcome, replies[low:high])
                else:
                    cast(TaskExtension, ext).after_return(self, outcome)
            except Exception:
                self._log_hook_failure(ext, "end")

    def _log_hook_failure(self, ext: Extension, hook: str) -> None:
        logger.exception(
            "celery_reliable: %s.%s failed for %s[%s]",
            ext.name,
            hook,
            self.name,
            self.request.id,
        )

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Celery's retry, except that ``dead_letter_for`` exceptions are not retried and a
        retry whose publish fails puts the message back instead of dropping it."""
        if (
            exc is not None
            and self.dead_letter_for
            and isinstance(exc, tuple(self.dead_letter_for))
        ):
            raise exc
        try:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        except Reject as rej:
            if self.request.is_eager:
                raise
            if isinstance(rej.reason, PayloadTooLarge):
                # Requeueing would fail the same way forever (the arguments came in through
                # send_task or an older, larger limit): fail for good, which dead-letters
                # the task with reason payload_too_large.
                raise rej.reason from None
            # Celery turns a failed retry publish into Reject(requeue=False), which drops the
            # message. With acks_late, requeue it instead: the task runs again later.
            logger.error(
                "Retry of %s[%s] could not be published (%r); requeueing the message",
                self.name,
                self.request.id,
                rej.reason,
            )
            raise requeue(reason_text(rej.reason)) from None

    # --- dead letters ---

    def _dead_letter_start_failure(self, exc: Exception) -> None:
        """An extension could not start this run (a header of the wrong type, a bug): it
        never ran, and acknowledged as a plain failure it would be gone. Dead-letter it
        (``malformed``, replayable once fixed). Raises Reject(requeue) if it cannot."""
        logger.error(
            "%s[%s] could not start (%r); %s",
            self.name,
            self.request.id,
            exc,
            "dead-lettering it" if self.dead_letter else "dead_letter=False, so it is dropped",
        )
        if self.dead_letter:
            entry = self.dead_letter_entry(exc, "malformed", tb_module.format_exc())
            self.record_dead_letter(entry, exc)

    def _dead_letter_failure(self, exc: BaseException) -> bool:
        """Write a failed-for-good run to the store. Raises Reject(requeue) if it cannot."""
        if not self.dead_letter:
            return False
        if isinstance(exc, PayloadTooLarge):
            reason = "payload_too_large"
        elif isinstance(exc, tuple(self.dead_letter_for)):
            reason = "dead_letter_for"
        else:
            reason = "max_retries"
        self.record_dead_letter(self.dead_letter_entry(exc, reason, tb_module.format_exc()), exc)
        return True

    def record_dead_letter(self, entry: DeadLetter, cause: BaseException) -> None:
        """Write ``entry`` (waiting out a short Redis blip) before the message is acked.

        Raises:
            Reject: with ``requeue=True`` when the store cannot be written: a failure we
                could not record is never acked, the message goes back for later.
        """
        try:
            DeadLetterStore(self.app).add_patiently(entry)
        except Exception as store_exc:
            logger.error(
                "Could not write dead letter for %s[%s] (%r) for %.0fs; requeueing the message",
                self.name,
                self.request.id,
                store_exc,
                WRITE_PATIENCE,
            )
            raise requeue(f"dead letter not written: {reason_text(store_exc)}") from cause

    def dead_letter_entry(
        self, exc: BaseException, reason: str, traceback: str | None
    ) -> DeadLetter:
        """A dead letter for the current request."""
        request = self.request
        info = request.delivery_info if isinstance(request.delivery_info, dict) else {}
        return record.build(
            task_id=request.id,
            task=self.name,
            reason=reason,
            exc=exc,
            traceback=traceback,
            args=request.args if request.args is not None else (),
            kwargs=request.kwargs,
            retries=request.retries,
            hostname=request.hostname,
            exchange=info.get("exchange"),
            routing_key=info.get("routing_key"),
            priority=info.get("priority"),
            headers={k: v for k, v in (request.headers or {}).items() if k != PUBLISHED_HEADER},
        )

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Dead-letter hard time limits, which Celery reports in the worker's main process
        (the pool process was killed, so ``__call__`` never saw the failure)."""
        if isinstance(exc, TimeLimitExceeded) and self.dead_letter and self.request.id != task_id:
            entry = record.build(
                task_id=task_id,
                task=self.name,
                reason="time_limit",
                exc=exc,
                traceback=getattr(einfo, "traceback", None),
                args=args if args is not None else (),
                kwargs=kwargs,
            )
            try:
                DeadLetterStore(self.app).add(entry)
            except Exception:
                logger.exception("Could not write dead letter for %s[%s]", self.name, task_id)
        super().on_failure(exc, task_id, args, kwargs, einfo)
