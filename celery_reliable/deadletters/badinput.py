"""Bad input on a reliable worker's queues is dead-lettered, and the worker keeps serving.

Celery drops (or acks) a message it cannot decode, one with no task header, or one naming a
task it does not know; and it trusts the headers and body of every other message, so a
``timelimit`` of ``["a", "b"]`` kills the worker's main process later, in the pool. This
consumer bootstep dead-letters all of them first (reason ``malformed`` or
``unknown_task``, with whatever could be read of the message) and then drops them.

What Celery 5.7 does with each kind of bad input (protocol 2), and where we catch it:

- headers that are not a mapping: ``on_unknown_message`` (reject).
- no ``task`` header: the body is decoded in the consumer; if that fails,
  ``on_decode_error`` (ack), else ``on_unknown_message`` (reject).
- a ``task`` header and a body that is not valid JSON: the strategy reads
  ``message.payload``, which raises ``DecodeError``: ``on_decode_error`` (ack).
- an unregistered task name: ``on_unknown_task`` (reject).
- ``InvalidTaskError`` / ``ContentDisallowed``: ``on_invalid_task`` (reject).
- a header or body of the wrong shape (``shape.message_problem``): checked in our guard
  around the consumer's message callback, before Celery reads the message. Unchecked,
  some of these kill the main process (``timelimit``), some lose the task after the ack
  (a body ``[[], {}, 5]``, an ``id`` that is a number).
- anything else the callback raises: the same guard dead-letters the message.

If the store cannot be written (Redis is down) the message is put back on the broker
instead of being dropped (after WRITE_PATIENCE, so a failing store is not looped hot), and
the failure is logged and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from ..core import instruments
from . import record
from .record import DeadLetter
from .shape import MalformedMessage, message_problem
from .store import WRITE_ERROR_LOG_INTERVAL, WRITE_PATIENCE, DeadLetterStore, LogThrottle

logger = logging.getLogger(__name__)
#: Failing dead-letter writes of bad messages are logged at most this often.
_write_errors = LogThrottle(WRITE_ERROR_LOG_INTERVAL)


def entry_for_message(
    message: Any,
    reason: str,
    exc: BaseException | None,
    hostname: str | None,
    payload: Any = None,
) -> DeadLetter:
    """A dead letter describing a message that could not become a task."""
    return record.from_message(message, reason, exc=exc, hostname=hostname, payload=payload)


class BadInputStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: dead-letter undecodable, headerless, malformed and unknown-task messages.

    The wrapping happens in ``__init__`` because ``Tasks.start`` binds ``on_decode_error``
    into the task consumer and the event loop captures the other handlers (and calls
    ``create_task_handler``) when it starts.

    Costs a few type checks per good message in the main process (the body it reads is
    the one Celery decodes anyway, cached on the message). Each bad message costs one
    Redis round trip (the ``dlq_add`` script).
    """

    label = "reliable-bad-input"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.consumer = c
        c.on_decode_error = self._wrap(c.on_decode_error, "malformed", _decode_args)
        c.on_unknown_message = self._wrap(c.on_unknown_message, "malformed", _body_message_args)
        c.on_unknown_task = self._wrap(c.on_unknown_task, "unknown_task", _body_message_exc_args)
        c.on_invalid_task = self._wrap(c.on_invalid_task, "malformed", _body_message_exc_args)
        c.create_task_handler = self._guard(c.create_task_handler)

    def _dead_letter(
        self, message: Any, reason: str, exc: BaseException | None, payload: Any
    ) -> bool:
        """Write the dead letter; on failure put the message back and return False."""
        hostname = self.consumer.hostname
        try:
            entry = entry_for_message(message, reason, exc, hostname, payload)
        except Exception as read_exc:  # pragma: no cover (the builder takes anything)
            logger.exception("Could not read a %s message; dead-lettering its raw body", reason)
            entry = record.build(
                entry_id=record.message_entry_id(message, None),
                task_id=None,
                task=None,
                reason=reason,
                exc=exc or read_exc,
                body=record.body_text(getattr(message, "body", None)),
            )
        try:
            DeadLetterStore(self.consumer.app).add(entry)
        except Exception as store_exc:
            instruments.store_error("dead_letter")
            if _write_errors.due():
                logger.error(
                    "Could not dead-letter a %s message (%r); putting it back on the broker in "
                    "%.0fs (logged once per %.0fs)",
                    reason,
                    store_exc,
                    WRITE_PATIENCE,
                    WRITE_ERROR_LOG_INTERVAL,
                )
            self._requeue_later(message)
            return False
        return True

    def _requeue_later(self, message: Any) -> None:
        """Put the message back after :data:`WRITE_PATIENCE`: requeued at once, it would
        come straight back and loop hot while the store fails. It stays unacknowledged
        meanwhile (a worker killed now leaves it to the broker's redelivery)."""

        def requeue() -> None:
            try:
                message.reject(requeue=True)
            except Exception:
                logger.exception("Could not requeue the message either")

        timer = getattr(self.consumer, "timer", None)
        if timer is None:
            requeue()
        else:
            timer.call_after(WRITE_PATIENCE, requeue)

    def _wrap(
        self,
        original: Callable[..., Any],
        reason: str,
        unpack: Callable[..., tuple[Any, Any, BaseException | None]],
    ) -> Callable[..., Any]:
        def handler(*args: Any) -> Any:
            message, payload, exc = unpack(*args)
            if not self._dead_letter(message, reason, exc, payload):
                return None
            return original(*args)

        return handler

    def _guard(self, create_task_handler: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap the consumer's message callback: a message of the wrong shape, or one that
        raises an exception Celery does not handle (it would stop the worker), is
        dead-lettered as ``malformed`` and dropped instead."""

        def create(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
            on_task_received = create_task_handler(*args, **kwargs)
            passthrough = tuple(self.consumer.connection_errors or ()) + tuple(
                self.consumer.channel_errors or ()
            )

            def reject(message: Any, exc: BaseException) -> None:
                if self._dead_letter(message, "malformed", exc, None):
                    message.reject_log_error(logger, passthrough)

            def guarded(message: Any) -> Any:
                problem = message_problem(message)
                if problem is not None:
                    logger.error("Malformed task message (%s); dead-lettering it", problem)
                    reject(message, MalformedMessage(problem))
                    return None
                try:
                    return on_task_received(message)
                except passthrough:
                    raise  # the consumer restarts its connection on these
                except Exception as exc:
                    if getattr(message, "acknowledged", True):
                        raise
                    logger.error(
                        "Message %r could not become a task (%r); dead-lettering it",
                        (message.headers or {}).get("id")
                        if isinstance(message.headers, dict)
                        else None,
                        exc,
                        exc_info=True,
                    )
                    reject(message, exc)
                    return None

            return guarded

        return create


def _decode_args(message: Any, exc: BaseException) -> tuple[Any, Any, BaseException | None]:
    return message, None, exc


def _body_message_args(body: Any, message: Any) -> tuple[Any, Any, BaseException | None]:
    return message, body, None


def _body_message_exc_args(
    body: Any, message: Any, exc: BaseException
) -> tuple[Any, Any, BaseException | None]:
    return message, body, exc
