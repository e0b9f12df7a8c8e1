"""Imports every feature module so each registers its installer with ``install``."""

from __future__ import annotations

from . import admission  # noqa: F401  (global rate limits, circuit breakers)
