"""celery-reliable: make a Celery app hard to lose work in.

Examples:
    >>> import celery_reliable
    >>> from celery_reliable import ReliableTask
    >>> celery_reliable.install(app)
    >>> @app.task(base=ReliableTask, bind=True, max_retries=5, autoretry_for=(IOError,))
    ... def charge(self, account_id, amount): ...
"""

from __future__ import annotations

from .core.config import Settings
from .deadletters.record import DeadLetter
from .deadletters.store import DeadLetterStore, Replayed
from .errors import (
    ConfigurationError,
    DeadLetterNotFound,
    IncompatibleVersion,
    PayloadTooLarge,
    ReliableError,
    UnknownTaskError,
)
from .install import install
from .task import ReliableTask

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetterStore",
    "IncompatibleVersion",
    "PayloadTooLarge",
    "ReliableError",
    "ReliableTask",
    "Replayed",
    "Settings",
    "UnknownTaskError",
    "install",
]
