"""Prometheus metrics served by each worker (see docs/metrics.md).

Examples:
    >>> app.conf.reliable_metrics_port = 9808
"""

from __future__ import annotations

from .exporter import install

__all__ = ["install"]
