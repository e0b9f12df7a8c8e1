"""Bad input on a reliable worker's queues is dead-lettered, and the worker keeps serving.

Celery drops (or acks) a message it cannot decode, one with no task header, or one naming a
task it does not know. This consumer bootstep wraps the consumer's handlers for those cases
so the message is first written to the dead-letter store (reason ``malformed`` or
``unknown_task``, with whatever could be read of it) and only then dropped by Celery.

What Celery 5.7 does with each kind of bad input (protocol 2), and where we catch it:

- headers that are not a mapping: ``on_unknown_message`` (reject).
- no ``task`` header: the body is decoded in the consumer; if that fails,
  ``on_decode_error`` (ack), else ``on_unknown_message`` (reject).
- a ``task`` header and a body that is not valid JSON: the strategy reads
  ``message.payload``, which raises ``DecodeError``: ``on_decode_error`` (ack).
- an unregistered task name: ``on_unknown_task`` (reject).
- ``InvalidTaskError`` / ``ContentDisallowed``: ``on_invalid_task`` (reject).
- valid JSON that is not ``[args, kwargs, embed]`` (``{"x": 1}``): ``Request.__init__``
  raises ``ValueError``/``TypeError``, which no handler catches; the worker dies with
  "Unrecoverable error" and the message is redelivered to the next worker (a poison
  message). We guard the consumer's message callback so such a message is dead-lettered
  (``malformed``) and dropped instead.

If the store cannot be written (Redis is down) the message is put back on the broker
instead of being dropped (after WRITE_PATIENCE, so a failing store is not looped hot), and
the failure is logged and counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from ..core import instruments
from .record import DeadLetter, exception_name, now
from .store import WRITE_ERROR_LOG_INTERVAL, WRITE_PATIENCE, DeadLetterStore, LogThrottle

logger = logging.getLogger(__name__)
#: Failing dead-letter writes of bad messages are logged at most this often.
_write_errors = LogThrottle(WRITE_ERROR_LOG_INTERVAL)

#: Longest part of an undecodable body kept in its dead letter, in bytes.
MAX_BODY_BYTES = 64 * 1024


def _text(body: Any) -> str | None:
    if body is None:
        return None
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)[:MAX_BODY_BYTES]
        return raw.decode("utf-8", errors="replace")
    return repr(body)[:MAX_BODY_BYTES]


def _raw_bytes(message: Any) -> bytes:
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        return body.encode("utf-8", "replace")
    return bytes(body or b"")


def _str(value: Any) -> str | None:
    """A header value as text (None stays None): headers of bad input can hold anything."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else repr(value)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def raw_entry(
    message: Any, reason: str, exc: BaseException | None, hostname: str | None
) -> DeadLetter:
    """The least a dead letter can hold: the raw body, where it came from, the error.

    Used when even reading the message's headers failed, so that nothing is dropped.
    """
    info = getattr(message, "delivery_info", None)
    info = info if isinstance(info, dict) else {}
    return DeadLetter(
        id="msg-" + hashlib.sha1(_raw_bytes(message)).hexdigest(),
        task_id=None,
        task=None,
        queue=_str(info.get("routing_key")),
        reason=reason,
        exception=exception_name(exc) if exc is not None else None,
        error=repr(exc) if exc is not None else None,
        hostname=hostname,
        failed_at=now(),
        routing_key=_str(info.get("routing_key")),
        body=_text(getattr(message, "body", None)),
    )


def entry_for_message(
    message: Any,
    reason: str,
    exc: BaseException | None,
    hostname: str | None,
    payload: Any = None,
) -> DeadLetter:
    """A dead letter describing a message that could not become a task."""
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    info = getattr(message, "delivery_info", None) or {}
    task_id = headers.get("id")
    if task_id is None and isinstance(payload, dict):
        task_id = payload.get("id")
    task_id = _str(task_id)
    entry_id = task_id or "msg-" + hashlib.sha1(_raw_bytes(message)).hexdigest()
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    body_text: str | None = None
    if reason == "unknown_task":
        try:
            decoded = message.decode() if payload is None else payload
            if isinstance(decoded, list | tuple) and len(decoded) >= 2:
                args, kwargs = list(decoded[0]), dict(decoded[1])
            elif isinstance(decoded, dict):
                args, kwargs = list(decoded.get("args", ())), dict(decoded.get("kwargs", {}))
        except Exception:
            body_text = _text(getattr(message, "body", None))
    else:
        body_text = _text(getattr(message, "body", None))
    custom = {k: v for k, v in headers.items() if isinstance(k, str) and k.startswith("x-")}
    return DeadLetter(
        id=entry_id,
        task_id=task_id,
        task=_str(
            headers.get("task") or (payload.get("task") if isinstance(payload, dict) else None)
        ),
        args=args,
        kwargs=kwargs,
        queue=_str(info.get("routing_key")),
        reason=reason,
        exception=exception_name(exc) if exc is not None else None,
        error=str(exc) if exc is not None else "message has no task headers",
        traceback=None,
        retries=_int(headers.get("retries")),
        hostname=hostname,
        failed_at=now(),
        exchange=info.get("exchange"),
        routing_key=info.get("routing_key"),
        priority=info.get("priority"),
        headers=custom,
        body=body_text,
    )


class BadInputStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: dead-letter undecodable, headerless and unknown-task messages.

    The wrapping happens in ``__init__`` because ``Tasks.start`` binds ``on_decode_error``
    into the task consumer and the event loop captures the other handlers (and calls
    ``create_task_handler``) when it starts.

    Costs nothing per good message: one ``try`` around Celery's callback. Each bad message
    costs one Redis round trip (the ``dlq_add`` script) in the worker's main process.
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
        except Exception as read_exc:
            logger.exception("Could not read a %s message; dead-lettering its raw body", reason)
            entry = raw_entry(message, reason, exc or read_exc, hostname)
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
        """Wrap the consumer's message callback: an exception Celery does not handle
        (it would stop the worker) dead-letters the message as ``malformed`` instead."""

        def create(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
            on_task_received = create_task_handler(*args, **kwargs)
            passthrough = tuple(self.consumer.connection_errors or ()) + tuple(
                self.consumer.channel_errors or ()
            )

            def guarded(message: Any) -> Any:
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
                    if self._dead_letter(message, "malformed", exc, None):
                        message.reject_log_error(logger, passthrough)
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
