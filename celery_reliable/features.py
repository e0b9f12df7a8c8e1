"""Imports every feature module so each registers its installer with ``install``."""

from __future__ import annotations

from . import ordering  # noqa: F401
