"""Exceptions raised by celery_reliable.

Every error the package raises derives from :class:`ReliableError`, so callers can catch
exactly what they mean (the same shape as :mod:`redis.exceptions`).
"""

from __future__ import annotations

from celery.exceptions import ImproperlyConfigured

__all__ = [
    "ConfigurationError",
    "DeadLetterNotFound",
    "IncompatibleVersion",
    "PayloadTooLarge",
    "ReliableError",
    "UnknownTaskError",
]


class ReliableError(Exception):
    """Base class of every exception raised by celery_reliable."""


class ConfigurationError(ReliableError, ImproperlyConfigured):
    """A setting or task option is invalid.

    The message always starts with the name of the setting (``reliable_*``) or of the
    task option, so one line in the worker log says what to fix.
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class IncompatibleVersion(ReliableError, ImproperlyConfigured):
    """An installed Celery, kombu, billiard or pybreaker release lacks a private part
    celery_reliable relies on (renamed or removed): ``install()`` refuses to run rather
    than let a guarantee switch off.

    Parameters:
      missing: ``(touchpoint, what relies on it, releases it was checked in)`` for each.
    """

    def __init__(self, missing: list[tuple[str, str, str]]) -> None:
        self.missing = missing
        lines = "; ".join(
            f"{name} (used by {used_by}; checked in {checked})"
            for name, used_by, checked in missing
        )
        super().__init__(
            f"the installed Celery/kombu/billiard/pybreaker releases lack {len(missing)} "
            f"part(s) celery_reliable relies on: {lines}. Install a supported release "
            "(see docs/installation.md)"
        )


class PayloadTooLarge(ReliableError, ValueError):
    """A publish was larger than ``reliable_max_payload_bytes``; nothing was sent."""

    def __init__(self, task_name: str, size: int, limit: int) -> None:
        self.task_name = task_name
        self.size = size
        self.limit = limit
        super().__init__(
            f"task {task_name!r}: serialized payload is {size} bytes, "
            f"over reliable_max_payload_bytes={limit}; nothing was sent"
        )


class DeadLetterNotFound(ReliableError, KeyError):
    """No dead letter has the given id."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        super().__init__(entry_id)

    def __str__(self) -> str:
        return f"no dead letter with id {self.entry_id!r}"


class UnknownTaskError(ReliableError, LookupError):
    """A replay names a task that this app (and so its workers) does not know."""

    def __init__(self, task_name: str) -> None:
        self.task_name = task_name
        super().__init__(
            f"task {task_name!r} is not registered in this app; no worker would run it. "
            "Import the module that defines it (or fix the name) before replaying"
        )
