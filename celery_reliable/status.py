"""The data behind ``celery reliable status``: one section per feature.

Examples:
    >>> from celery_reliable.status import collect
    >>> collect(app)["dead_letters"]
    {'count': 3, 'added': 3, 'dropped': 0, 'expired': 0}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .deadletter import DeadLetterStore

#: Section name -> function ``(app) -> JSON-able value``, in display order.
_sections: dict[str, Callable[[Any], Any]] = {}


def register(name: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator: add a section to the status report."""

    def decorate(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _sections[name] = fn
        return fn

    return decorate


@register("dead_letters")
def _dead_letters(app: Any) -> dict[str, int]:
    return DeadLetterStore(app).stats()


#: Sections shown first, in this order; any other section follows in registration order.
DISPLAY_ORDER = ("workers", "orphans", "breakers", "buckets", "ordering", "dead_letters")


def collect(app: Any) -> dict[str, Any]:
    """Every section of the status report, as one JSON-able dict."""
    from . import features  # noqa: F401  (every feature registers its section on import)

    rank = {name: i for i, name in enumerate(DISPLAY_ORDER)}
    names = sorted(_sections, key=lambda n: rank.get(n, len(rank)))
    return {name: _sections[name](app) for name in names}
