"""Is a task message one Celery can run? Checked before Celery sees it.

Celery trusts the headers of a protocol-2 task message: a ``timelimit`` of
``["a", "b"]`` is handed to the pool and kills the worker's main process later, an ``id``
that is not a string breaks every Redis key built from it, a body that is not
``[args, kwargs, embed]`` is dropped with a log line. :func:`message_problem` says what is
wrong with a message (or None), so the consumer can dead-letter it instead.

It reads only what Celery itself reads (the decoded body is cached on the message and
reused by Celery), so a good message costs a few type checks in the main process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware, timezone

#: Longest task id accepted, in characters (ids name Redis keys and dead letters).
MAX_ID_CHARS = 1024
#: Largest time limit accepted in a ``timelimit`` header, in seconds (a year).
MAX_TIME_LIMIT = 365 * 24 * 3600.0
#: Largest ``retries`` header accepted.
MAX_RETRIES_HEADER = 2**31 - 1
#: Keys Celery puts in the third element of a protocol-2 body.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


class MalformedMessage(ValueError):
    """A task message whose headers or body Celery could not safely run (the dead
    letter's ``exception``; its message says which header or part of the body)."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _id(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "expected a non-empty string"
    if len(value) > MAX_ID_CHARS:
        return f"longer than {MAX_ID_CHARS} characters"
    return None


def _optional_str(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "expected a string or null"


def _optional_int(value: Any) -> str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return "expected a whole number or null"


def _retries(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_RETRIES_HEADER:
        return None
    return "expected a whole number >= 0"


def _seconds(value: Any) -> bool:
    return value is None or (
        _number(value) and math.isfinite(value) and 0 <= value <= MAX_TIME_LIMIT
    )


def _timelimit(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) and len(value) == 2 and all(_seconds(v) for v in value):
        return None
    return f"expected [hard, soft] seconds (each null or 0..{MAX_TIME_LIMIT:.0f})"


def _when(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        return "expected an ISO 8601 date-time string or null"
    try:
        # what the consumer does with it: parse, make aware, convert to a timestamp
        parsed = maybe_iso8601(value)
        if parsed is None:
            raise ValueError(value)
        timezone.to_system(maybe_make_aware(parsed)).timestamp()
    except (ValueError, TypeError, OverflowError, AttributeError):
        return "expected an ISO 8601 date-time string or null"
    return None


def _str_list(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return None
    return "expected a list of strings or null"


def _optional_dict(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict) else "expected an object or null"


def _optional_bool(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "expected true, false or null"


#: The protocol-2 headers Celery (or a ReliableTask) reads, and a check of each.
HEADER_CHECKS: Mapping[str, Callable[[Any], str | None]] = {
    "task": _id,
    "id": _id,
    "root_id": _optional_str,
    "parent_id": _optional_str,
    "group": _optional_str,
    "group_index": _optional_int,
    "shadow": _optional_str,
    "retries": _retries,
    "timelimit": _timelimit,
    "eta": _when,
    "expires": _when,
    "argsrepr": _optional_str,
    "kwargsrepr": _optional_str,
    "origin": _optional_str,
    "ignore_result": _optional_bool,
    "stamped_headers": _str_list,
    "stamps": _optional_dict,
    "replaced_task_nesting": _optional_int,
}


def _signatures(value: Any) -> bool:
    return value is None or (
        isinstance(value, list | tuple) and all(isinstance(v, dict) for v in value)
    )


def body_problem(body: Any) -> str | None:
    """What is wrong with a decoded protocol-2 body ``[args, kwargs, embed]``, or None."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "body: expected [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return "body: args: expected a list"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "body: kwargs: expected an object with string keys"
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return "body: embed: expected an object or null"
    unknown = sorted(str(k) for k in embed if k not in EMBED_KEYS)
    if unknown:
        return f"body: embed: unknown keys {unknown}"
    for name in ("callbacks", "errbacks", "chain"):
        if not _signatures(embed.get(name)):
            return f"body: embed: {name}: expected a list of signatures or null"
    if _optional_dict(embed.get("chord")):
        return "body: embed: chord: expected a signature or null"
    return None


def message_problem(message: Any) -> str | None:
    """Why Celery could not safely run this task message, or None when it can.

    Only messages with a mapping of headers that names a ``task`` are checked (protocol 2,
    or a protocol 1 body under protocol-2 headers); the rest take Celery's own paths for
    unknown or undecodable messages, which are dead-lettered there. A body that does not
    decode is left to Celery too (it reports a decode error).
    """
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    try:
        payload = message.payload
    except Exception:
        return None
    fields = headers
    if isinstance(payload, dict) and "args" in payload:  # Celery's "hybrid" message:
        fields = {**payload, **headers}  # a protocol 1 body under protocol 2 headers
        payload = [payload.get("args", ()), payload.get("kwargs", {}), None]
    if "id" not in fields:
        return "header 'id': missing"
    for name, check in HEADER_CHECKS.items():
        if name in fields:
            problem = check(fields[name])
            if problem is not None:
                return f"header {name!r}: {problem}, got {_short(fields[name])}"
    return body_problem(payload)


#: Characters of a bad value quoted in a problem description.
QUOTE_CHARS = 80


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."
