"""A read-only view of the ordering lines: parked tasks, and keys that are blocked.

A key is *blocked* when tasks are parked behind it, nobody holds it (no running holder
with a live lease), it is not waiting for a retry of its own, and nothing happened on it
for longer than ``blocked_after`` seconds: its head has waited that long. The view reads
the sweep's index of ordering keys (one ZRANGE, oldest activity first) and one pipelined
HMGET + HLEN per key, capped at :data:`VIEW_LIMIT` keys; the keyspace is never scanned.

Examples:
    >>> view = lines_view(app, blocked_after=60.0)
    >>> view.parked, [(b.group, b.key) for b in view.blocked]
    (3, [('shop.ship', 'order-7')])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..core.store import store_for
from .extension import index_key, key_names

#: Most keys one view reads (oldest activity first: blocked keys sort first).
VIEW_LIMIT = 10_000
#: Seconds the head of a line may wait before its key counts as blocked.
DEFAULT_BLOCKED_AFTER = 60.0


@dataclass(frozen=True)
class BlockedKey:
    """One blocked ordering key: since when its head waits, and how many are parked."""

    group: str
    key: str
    since: float
    waited: float
    parked: int
    next_seq: int


@dataclass
class LinesView:
    """Ordering keys known to the sweep, tasks parked, and the blocked keys (oldest first)."""

    keys: int = 0
    parked: int = 0
    blocked: list[BlockedKey] = field(default_factory=list)


def lines_view(
    app: Any, blocked_after: float = DEFAULT_BLOCKED_AFTER, limit: int = VIEW_LIMIT
) -> LinesView:
    """Read the ordering lines once (see the module docstring)."""
    store = store_for(app)
    client: Any = store.client
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    members = client.zrange(index_key(store), 0, limit - 1, withscores=True)
    view = LinesView(keys=len(members))
    if not members:
        return view
    places = [json.loads(m) for m, _ in members]
    with client.pipeline(transaction=False) as pipe:
        for group, key in places:
            state_key, parked_key = key_names(store, group, key)
            pipe.hmget(state_key, "next", "tok", "lease", "wait", "retry", "hand")
            pipe.hlen(parked_key)
        replies = pipe.execute()
    for i, ((group, key), (_, score)) in enumerate(zip(places, members, strict=True)):
        fields, parked = replies[2 * i], int(replies[2 * i + 1])
        view.parked += parked
        if not parked:
            continue
        nxt, tok, lease, wait, retry, hand = (int(float(f)) if f else 0 for f in fields)
        if tok and lease > now_ms:
            continue  # a live holder runs: the line moves
        if retry > now_ms:
            continue  # the holder's own retry is due later: expected wait
        since_ms = max(int(score), wait, hand, lease if tok else 0)
        waited = (now_ms - since_ms) / 1000
        if waited >= blocked_after:
            view.blocked.append(
                BlockedKey(group, key, since_ms / 1000, round(waited, 1), parked, nxt or 1)
            )
    view.blocked.sort(key=lambda b: b.since)
    return view
