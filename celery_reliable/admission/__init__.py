"""Admission control at task start: global rate limits and shared circuit breakers
(see docs/rate-limits.md and docs/circuit-breakers.md).

Examples:
    >>> @app.task(base=ReliableTask, bind=True, global_rate_limit="20/s", breaker="vendor")
    ... def call_vendor(self, tenant): ...
"""

from __future__ import annotations

from .extension import breakers_status, buckets_status, install

__all__ = ["breakers_status", "buckets_status", "install"]
