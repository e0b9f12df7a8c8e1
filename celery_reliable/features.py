"""Imports every feature module so each registers its installer with ``install``."""

from __future__ import annotations

from . import registry  # noqa: F401  (worker registry, in-flight ledger, status sections)
