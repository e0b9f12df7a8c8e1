"""A dead letter: one failed-for-good task, as the store keeps it, and the one place that
builds one (:func:`build`, :func:`from_message`) and reads a task body (:func:`arguments`).

Everything a dead letter holds may come from a hostile message: the builders turn every
field into its type (a header ``retries: "abc"`` becomes 0, an ``id`` that is a number
becomes its text) and cut text fields to a bounded size, naming what was cut in
``truncated``, so writing a dead letter never fails and never stores a 50 MB entry.

Examples:
    >>> entry = build(task_id=task_id, task="shop.charge", reason="max_retries",
    ...               args=[1, 2], exc=exc)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Reasons a task is dead-lettered (``DeadLetter.reason``).
REASONS = (
    "max_retries",
    "dead_letter_for",
    "orphaned",
    "unknown_task",
    "malformed",
    "payload_too_large",
    "time_limit",
    "ordering_skipped",
    "stale_copy",
    "corrupt",
)
#: The reason shown for a stored entry that cannot be read (never written as such).
CORRUPT = "corrupt"
#: Longest text kept of a field that a message or a task controls (the error message, a
#: raw body, the preview of cut arguments), in characters; longer text is cut and the
#: field is named in ``DeadLetter.truncated``.
MAX_FIELD_CHARS = 64 * 1024
#: Longest traceback kept, in characters (the tail is kept: it names the failing line).
MAX_TRACEBACK_CHARS = 20_000
#: Longest name-like field kept (entry id, task id, task name, queue, host, exception).
MAX_NAME_CHARS = 1024
#: Appended where text was cut.
CUT_MARK = "...[truncated]"
#: Headers copied into a dead letter (and into its replay): the custom ones.
CUSTOM_HEADER_PREFIX = "x-"


@dataclass
class DeadLetter:
    """One failed-for-good task, with everything needed to inspect and replay it.

    Parameters:
      id: the entry id (the task id; unique in the store).
      task_id: the failed task's id.
      task: the task name.
      args, kwargs: the task's arguments.
      queue: the queue it was consumed from (its routing key).
      reason: one of :data:`REASONS`.
      exception: the exception's type name (``module.Class``).
      error: the exception's message.
      traceback: the formatted traceback.
      retries: how many times it had been retried.
      hostname: the worker node that gave up on it.
      failed_at: Unix seconds.
      exchange, routing_key, priority: routing to replay it where it came from.
      headers: the task's custom headers (replayed with it).
      body: for ``malformed`` messages, whatever could be read of the raw body.
      replayed_from: the dead-letter id this task was itself replayed from, if any.
      truncated: the fields that were cut to keep the entry bounded (empty when whole).
    """

    id: str
    task_id: str | None
    task: str | None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    reason: str = "max_retries"
    exception: str | None = None
    error: str | None = None
    traceback: str | None = None
    retries: int = 0
    hostname: str | None = None
    failed_at: float = 0.0
    exchange: str | None = None
    routing_key: str | None = None
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    body: str | None = None
    replayed_from: str | None = None
    truncated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=repr, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        """Read a stored entry.

        Raises:
            CorruptEntry: it is not JSON, lacks a required field or has a wrong-typed one.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise CorruptEntry(f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptEntry(f"not a JSON object but {type(data).__name__}")
        missing = [name for name in _REQUIRED_FIELDS if name not in data]
        if missing:
            raise CorruptEntry(f"no {', '.join(missing)}")
        for name, types in _FIELD_TYPES.items():
            value = data.get(name)
            if name in data and (not isinstance(value, types) or isinstance(value, bool)):
                raise CorruptEntry(f"{name} is {_quote(value)}, not {_type_names(types)}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def corrupt(cls, entry_id: str, raw: str | bytes | None, problem: str) -> DeadLetter:
        """What ``list``/``show`` give for a stored entry that cannot be read."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return cls(
            id=entry_id,
            task_id=None,
            task=None,
            reason=CORRUPT,
            error=f"corrupt entry: {problem}; delete it with: dlq purge {entry_id}",
            body=_cut(text, MAX_FIELD_CHARS),
        )


class CorruptEntry(ValueError):
    """A stored dead letter cannot be read (see :meth:`DeadLetter.from_json`)."""


_OPTIONAL_STR: tuple[type, ...] = (str, type(None))
#: The type every stored field must have; an entry that breaks one is shown as corrupt.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "task_id": _OPTIONAL_STR,
    "task": _OPTIONAL_STR,
    "args": (list,),
    "kwargs": (dict,),
    "queue": _OPTIONAL_STR,
    "reason": (str,),
    "exception": _OPTIONAL_STR,
    "error": _OPTIONAL_STR,
    "traceback": _OPTIONAL_STR,
    "retries": (int,),
    "hostname": _OPTIONAL_STR,
    "failed_at": (int, float),
    "exchange": _OPTIONAL_STR,
    "routing_key": _OPTIONAL_STR,
    "priority": (int, type(None)),
    "headers": (dict,),
    "body": _OPTIONAL_STR,
    "replayed_from": _OPTIONAL_STR,
    "truncated": (list,),
}
#: Fields every stored entry has (the others have defaults, so older entries still read).
_REQUIRED_FIELDS = ("id", "task_id", "task", "reason")


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


# --- building: the one place a DeadLetter is made ---


def text(value: Any, limit: int = MAX_NAME_CHARS) -> str | None:
    """``value`` as bounded text (None and "" stay None): fields of bad input hold anything."""
    if value is None or value == "":
        return None
    return _cut(value if isinstance(value, str) else repr(value), limit)


def whole_number(value: Any) -> int:
    """``value`` as an int >= 0, or 0 when it is not one (a header ``retries: "abc"``)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return 0


def _cut(value: str | None, limit: int) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + CUT_MARK


def _quote(value: Any, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def custom_headers(headers: Any) -> dict[str, Any]:
    """The custom (``x-``) headers of a message, which a replay carries again."""
    if not isinstance(headers, Mapping):
        return {}
    prefix = CUSTOM_HEADER_PREFIX
    return {k: v for k, v in headers.items() if isinstance(k, str) and k.startswith(prefix)}


def arguments(body: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """``(args, kwargs)`` of a decoded task body, or None when it is not one.

    Protocol 2 bodies are ``[args, kwargs, embed]``; protocol 1 bodies are objects with
    ``args`` and ``kwargs``.
    """
    if isinstance(body, list | tuple) and len(body) == 3:
        args, kwargs = body[0], body[1]
    elif isinstance(body, dict):
        args, kwargs = body.get("args", ()), body.get("kwargs", {})
    else:
        return None
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return None
    if not all(isinstance(k, str) for k in kwargs):
        return None
    return list(args), dict(kwargs)


def body_text(raw: Any) -> str | None:
    """A message's raw body as text, cut to :data:`MAX_FIELD_CHARS`."""
    if raw is None:
        return None
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw)[: MAX_FIELD_CHARS + 1].decode("utf-8", errors="replace")
    if isinstance(raw, str):  # py-amqp hands over text bodies already decoded
        return raw[: MAX_FIELD_CHARS + 1]
    return repr(raw)[: MAX_FIELD_CHARS + 1]


def raw_bytes(message: Any) -> bytes:
    """The raw body of a kombu message, as bytes."""
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        return body.encode("utf-8", "replace")
    try:
        return bytes(body or b"")
    except TypeError:
        return repr(body).encode()


def message_entry_id(message: Any, task_id: Any) -> str:
    """The entry id of a dead-lettered message: its task id when that is a usable string.

    Otherwise (no id, or a number, a list...: their text could equal another message's)
    ``msg-<sha1 of the body>-<unique part>``: the broker's delivery tag when it is a string
    that survives redelivery (kombu's Redis transport), so a message written twice is
    still one entry, else a random part, so two equal messages are two entries.
    """
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_NAME_CHARS:
        return task_id
    digest = hashlib.sha1(raw_bytes(message)).hexdigest()[:20]
    tag = getattr(message, "delivery_tag", None)
    unique = tag if isinstance(tag, str) and 0 < len(tag) <= 64 else uuid.uuid4().hex
    return f"msg-{digest}-{unique}"


def build(
    *,
    task_id: Any,
    task: Any,
    reason: str,
    exc: BaseException | None = None,
    error: Any = None,
    traceback: str | None = None,
    args: Any = (),
    kwargs: Any = None,
    retries: Any = 0,
    hostname: Any = None,
    queue: Any = None,
    exchange: Any = None,
    routing_key: Any = None,
    priority: Any = None,
    headers: Any = None,
    body: str | None = None,
    entry_id: str | None = None,
) -> DeadLetter:
    """A dead letter with every field of its type; ``id`` defaults to the task id.

    ``headers`` are the task's custom headers (a replay carries them again).

    Arguments and keyword arguments that are not a list and an object of string keys are
    kept as text in ``body`` instead. Size limits are applied by :func:`bounded` when the
    entry is stored.
    """
    tid = text(task_id, MAX_NAME_CHARS + 1)
    args_ok = isinstance(args, list | tuple)
    kwargs_ok = kwargs is None or (
        isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)
    )
    if not (args_ok and kwargs_ok) and body is None:
        body = _cut(repr([args, kwargs]), MAX_FIELD_CHARS)
    custom = (
        {k: v for k, v in headers.items() if isinstance(k, str)}
        if isinstance(headers, Mapping)
        else {}
    )
    replayed_from = custom.get("x-reliable-replayed-from")
    if exc is not None and error is None:
        error = str(exc)
    return DeadLetter(
        id=entry_id or tid or "task-" + uuid.uuid4().hex,
        task_id=tid,
        task=text(task),
        args=list(args) if args_ok and kwargs_ok else [],
        kwargs=dict(kwargs or {}) if args_ok and kwargs_ok else {},
        queue=text(queue if queue is not None else routing_key),
        reason=reason,
        exception=exception_name(exc) if exc is not None else None,
        error=text(error, MAX_FIELD_CHARS + 1),
        traceback=traceback,
        retries=whole_number(retries),
        hostname=text(hostname),
        failed_at=now(),
        exchange=text(exchange),
        routing_key=text(routing_key),
        priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else None,
        headers=custom,
        body=body,
        replayed_from=replayed_from if isinstance(replayed_from, str) else None,
    )


def from_message(
    message: Any,
    reason: str,
    *,
    exc: BaseException | None = None,
    error: Any = None,
    hostname: Any = None,
    payload: Any = None,
    exchange: Any = None,
    routing_key: Any = None,
) -> DeadLetter:
    """A dead letter for a kombu message that did not (or could not) run as a task.

    The arguments are read from the body when it decodes into a task body; when it does
    not (``malformed``), the raw body is kept as text instead, which ``dlq replay`` reads
    again. ``payload`` is the already decoded body, when the caller has it.
    """
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    info = getattr(message, "delivery_info", None)
    info = info if isinstance(info, dict) else {}
    properties = getattr(message, "properties", None)
    properties = properties if isinstance(properties, dict) else {}
    decoded = payload
    if decoded is None and reason != "malformed":
        try:
            decoded = message.decode()
        except Exception:
            decoded = None
    task_id = headers.get("id")
    task = headers.get("task")
    if isinstance(decoded, dict):  # protocol 1 names them in the body
        task_id = task_id if task_id is not None else decoded.get("id")
        task = task if task is not None else decoded.get("task")
    found = arguments(decoded) if reason != "malformed" else None
    routing_key = routing_key if routing_key is not None else info.get("routing_key")
    return build(
        entry_id=message_entry_id(message, task_id),
        task_id=task_id,
        task=task,
        reason=reason,
        exc=exc,
        error=error if error is not None or exc is not None else "message has no task headers",
        args=found[0] if found else (),
        kwargs=found[1] if found else None,
        retries=headers.get("retries"),
        hostname=hostname,
        queue=routing_key,
        exchange=exchange if exchange is not None else info.get("exchange"),
        routing_key=routing_key,
        priority=properties.get("priority", info.get("priority")),
        headers=custom_headers(headers),
        body=None if found else body_text(getattr(message, "body", None)),
    )


def bounded(entry: DeadLetter, arguments_limit: int) -> DeadLetter:
    """``entry`` cut to a bounded size; every field that was cut is named in ``truncated``.

    Arguments whose JSON is longer than ``arguments_limit`` characters are dropped (a
    preview of them is kept in ``body``): such an entry cannot be replayed. Text fields
    are cut to :data:`MAX_FIELD_CHARS` (the traceback keeps its last
    :data:`MAX_TRACEBACK_CHARS`), custom headers past that size are dropped.
    """
    cut = [name for name in entry.truncated]
    if entry.traceback and len(entry.traceback) > MAX_TRACEBACK_CHARS:
        entry.traceback = "...\n" + entry.traceback[-MAX_TRACEBACK_CHARS:]
        cut.append("traceback")
    for name in ("error", "body"):
        value = getattr(entry, name)
        if value is not None and len(value) > MAX_FIELD_CHARS:
            setattr(entry, name, _cut(value, MAX_FIELD_CHARS))
            cut.append(name)
    if len(json.dumps(entry.headers, default=repr)) > MAX_FIELD_CHARS:
        entry.headers = {}
        cut.append("headers")
    encoded = json.dumps([entry.args, entry.kwargs], default=repr)
    if len(encoded) > arguments_limit:
        if entry.body is None:
            entry.body = _cut(encoded[: MAX_FIELD_CHARS + 1], MAX_FIELD_CHARS)
        entry.args, entry.kwargs = [], {}
        cut += ["args", "kwargs"]
    entry.truncated = list(dict.fromkeys(cut))
    return entry


def exception_name(exc: BaseException) -> str:
    """``module.Class`` of ``exc`` (just ``Class`` for builtins)."""
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def now() -> float:
    """Unix seconds (a seam for the clock, kept in one place)."""
    return time.time()
