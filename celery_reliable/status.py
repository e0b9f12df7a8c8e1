"""The data behind ``celery reliable status``: one section per feature, in display order.

Examples:
    >>> from celery_reliable.status import collect
    >>> collect(app)["dead_letters"]
    {'count': 3, 'added': 3, 'dropped': 0, 'expired': 0}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import admission, ordering, orphans
from .deadletters import DeadLetterStore


def dead_letters_status(app: Any) -> dict[str, int]:
    """Size and counters of the dead-letter store."""
    return DeadLetterStore(app).stats()


#: Section name -> function ``(app) -> JSON-able value``, in display order.
SECTIONS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("workers", orphans.live_workers),
    ("orphans", orphans.reaper_stats),
    ("breakers", admission.breakers_status),
    ("buckets", admission.buckets_status),
    ("ordering", ordering.status),
    ("dead_letters", dead_letters_status),
)


def collect(app: Any) -> dict[str, Any]:
    """Every section of the status report, as one JSON-able dict."""
    return {name: section(app) for name, section in SECTIONS}
