"""Graceful drain on SIGTERM (see docs/drain.md).

Examples:
    >>> app.conf.reliable_drain_timeout = 25
"""

from __future__ import annotations

from .drainer import install

__all__ = ["install"]
