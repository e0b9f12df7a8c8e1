"""A read-only view of the breakers and buckets named by task options.

The names come from the app's registered tasks (``breaker=...``, and
``global_rate_limit=...`` without ``global_rate_key``), so reading them is one pipelined
HMGET per name: the keyspace is never scanned. Per-key (per-tenant) buckets are not listed:
their number has no bound.

Examples:
    >>> option_breakers(app)
    {'payments': {'state': 'open', 'failures': 5, 'opened_at': 1764601234.5}}
    >>> option_buckets(app)["shop.call_vendor"]["tokens"]
    0.4
"""

from __future__ import annotations

from typing import Any

from ..core.store import store_for
from .extension import _US, admission_of, breaker_key, bucket_key


def _specs(app: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    breakers: dict[str, Any] = {}
    buckets: dict[str, Any] = {}
    for task in list(app.tasks.values()):
        if not hasattr(task, "breaker") or not hasattr(task, "global_rate_limit"):
            continue  # not a ReliableTask
        try:
            spec = admission_of(task)
        except Exception:  # invalid options stop the worker; a view just skips them
            continue
        if spec.breaker is not None:
            breakers.setdefault(spec.breaker.name, spec.breaker)
        if spec.bucket is not None and spec.bucket.key is None:
            buckets.setdefault(spec.bucket.name, spec.bucket)
    return breakers, buckets


def option_view(app: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(breakers, buckets)`` by name, read in two round trips."""
    breakers, buckets = _specs(app)
    if not breakers and not buckets:
        return {}, {}
    store = store_for(app)
    client: Any = store.client
    seconds, micros = client.time()  # apart: a cluster pipeline refuses TIME
    batch = store.pipeline()
    for name in breakers:
        batch.command("hmget", breaker_key(store, name), "state", "fails", "opened_at")
    for name in buckets:
        batch.command("hmget", bucket_key(store, name), "tat", "sat")
    replies = [None, *batch.execute()]
    now = int(seconds) * _US + int(micros)
    out_breakers: dict[str, dict[str, Any]] = {}
    for name, (state, fails, opened) in zip(breakers, replies[1 : 1 + len(breakers)], strict=True):
        out_breakers[name] = {
            "state": state or "closed",
            "failures": int(fails or 0),
            "opened_at": int(opened) / _US if opened and int(opened) else None,
        }
    out_buckets: dict[str, dict[str, Any]] = {}
    for (name, spec), (tat_raw, sat_raw) in zip(
        buckets.items(), replies[1 + len(breakers) :], strict=True
    ):
        interval, burst = spec.interval_us, spec.burst
        busy_until = max(int(tat_raw or 0), int(sat_raw or 0), now)
        tokens = (now - (busy_until - burst * interval)) / interval
        tokens = max(0.0, min(float(burst), tokens))
        out_buckets[name] = {
            "rate_per_s": round(spec.rate, 3),
            "burst": burst,
            "tokens": round(tokens, 2),
            "throttling": tokens < 1.0,
            "next_token_in_s": round(
                max(0.0, busy_until - burst * interval + interval - now) / _US, 3
            ),
        }
    return out_breakers, out_buckets
