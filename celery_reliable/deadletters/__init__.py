"""The dead-letter store, and bad input on a reliable worker's queues written into it
(see docs/dead-letters.md).

Examples:
    >>> DeadLetterStore(app).list(task="shop.charge", limit=10)
"""

from __future__ import annotations

from typing import Any

from .badinput import BadInputStep
from .record import REASONS, DeadLetter
from .store import DeadLetterStore, Replayed

__all__ = ["REASONS", "DeadLetter", "DeadLetterStore", "Replayed", "install"]


def install(app: Any) -> None:
    """Guard the consumer so undecodable and unknown-task messages are dead-lettered."""
    app.steps["consumer"].add(BadInputStep)
