"""Imports every feature module so each registers its installer with ``install``."""

from __future__ import annotations

from . import admission, drain, metrics, ordering, registry

#: Feature modules, each registering a ``@feature`` installer when imported.
MODULES = (admission, drain, metrics, ordering, registry)
