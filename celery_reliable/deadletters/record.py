"""A dead letter: one failed-for-good task, as the store keeps it.

Examples:
    >>> DeadLetter(id=task_id, task_id=task_id, task="shop.charge", reason="max_retries")
"""

from __future__ import annotations

import json
import time
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
)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=repr, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeadLetter:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def exception_name(exc: BaseException) -> str:
    """``module.Class`` of ``exc`` (just ``Class`` for builtins)."""
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def now() -> float:
    """Unix seconds (a seam for the clock, kept in one place)."""
    return time.time()
