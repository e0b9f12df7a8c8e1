"""The data behind ``celery reliable status`` and the reaper's cluster-wide metrics.

Everything here reads the store's indexes (the worker registry, the dead-letter counts, the
ordering index, the breakers and buckets named by task options), never the keyspace, so it
stays fast with 100,000 dead letters.

Examples:
    >>> from celery_reliable.status import collect
    >>> collect(app)["dead_letters"]["by_reason"]
    {'max_retries': 2, 'dead_letter_for': 1}
    >>> cluster_view(app).workers
    2
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import admission, ordering, orphans
from .admission.view import option_view
from .deadletters import REASONS, DeadLetterStore
from .metrics.cluster import ClusterView
from .ordering.lines import DEFAULT_BLOCKED_AFTER, lines_view
from .orphans.reaper import last_pass

#: Blocked ordering keys listed by ``status`` at most (the count is always whole).
BLOCKED_KEYS_SHOWN = 20
#: Exception types listed by ``status`` at most (largest counts first).
EXCEPTIONS_SHOWN = 20
#: ``orphans_recovered_total`` actions: the reaper's counters, by name.
RECOVERY_ACTIONS = ("recovered", "restored_prefetched", "restored_unclaimed", "dead_lettered")


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else None


def dead_letters_status(app: Any) -> dict[str, Any]:
    """Size and counters of the dead-letter store, by reason and by exception type."""
    store = DeadLetterStore(app)
    out: dict[str, Any] = dict(store.stats())
    counts = store.counts()
    out["by_reason"] = dict(sorted(counts["reason"].items(), key=lambda kv: -kv[1]))
    top = sorted(counts["exception"].items(), key=lambda kv: -kv[1])[:EXCEPTIONS_SHOWN]
    out["by_exception"] = dict(top)
    uncounted = out["count"] - sum(counts["reason"].values())
    if uncounted > 0:  # written by a version that kept no counts
        out["uncounted"] = uncounted
    return out


def reaper_status(app: Any) -> dict[str, Any]:
    """The last reaper pass: when, how long, by whom."""
    info = last_pass(app)
    if not info:
        return {"last_pass": None}
    at = float(info.get("at") or 0)
    return {
        "last_pass": _when(at),
        "age_s": round(max(0.0, time.time() - at), 1),
        "seconds": info.get("seconds"),
        "by": info.get("by"),
    }


def blocked_keys_status(app: Any) -> list[dict[str, Any]]:
    """Ordering keys whose head has waited longer than the threshold, oldest first."""
    view = lines_view(app, DEFAULT_BLOCKED_AFTER)
    return [
        {
            "group": b.group,
            "key": b.key,
            "since": _when(b.since),
            "waited_s": b.waited,
            "parked": b.parked,
            "next_seq": b.next_seq,
        }
        for b in view.blocked[:BLOCKED_KEYS_SHOWN]
    ]


def throttling_status(app: Any) -> dict[str, dict[str, Any]]:
    """Buckets (named by task options) that have no token now."""
    _, buckets = option_view(app)
    return {name: b for name, b in buckets.items() if b["throttling"]}


def cluster_view(app: Any, blocked_after: float = DEFAULT_BLOCKED_AFTER) -> ClusterView:
    """The cluster-wide gauges the reaper exports, read from the store's indexes."""
    workers = orphans.live_workers(app)
    dlq = DeadLetterStore(app)
    by_reason = {reason: 0 for reason in REASONS}
    by_reason.update(dlq.counts()["reason"])
    stats = orphans.reaper_stats(app)
    lines = lines_view(app, blocked_after)
    breakers, buckets = option_view(app)
    return ClusterView(
        workers=sum(1 for w in workers if w["alive"]),
        in_flight=sum(int(w["in_flight"]) for w in workers),
        dead_letters=by_reason,
        recovered={action: int(stats.get(action, 0)) for action in RECOVERY_ACTIONS},
        ordering_parked=lines.parked,
        ordering_blocked_keys=len(lines.blocked),
        breakers={name: b["state"] for name, b in breakers.items()},
        buckets={name: float(b["tokens"]) for name, b in buckets.items()},
    )


#: Section name -> function ``(app) -> JSON-able value``, in display order.
SECTIONS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("workers", orphans.live_workers),
    ("reaper", reaper_status),
    ("orphans", orphans.reaper_stats),
    ("breakers", admission.breakers_status),
    ("buckets", admission.buckets_status),
    ("throttling", throttling_status),
    ("ordering", ordering.status),
    ("blocked_keys", blocked_keys_status),
    ("dead_letters", dead_letters_status),
)


def collect(app: Any) -> dict[str, Any]:
    """Every section of the status report, as one JSON-able dict."""
    return {name: section(app) for name, section in SECTIONS}
