"""Per-app state: the validated settings and the registered task extensions.

Every feature reads the app's settings through :func:`settings_of` (validated once per
process) and registers its task hooks with :func:`add_extension`.

Examples:
    >>> settings_of(app).worker_timeout
    10.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Settings

if TYPE_CHECKING:
    from .extensions import Extension

_SETTINGS_ATTR = "_celery_reliable_settings"
_EXTENSIONS_ATTR = "_celery_reliable_extensions"


def settings_of(app: Any) -> Settings:
    """The validated settings of ``app`` (read once per process, on first use)."""
    settings = getattr(app, _SETTINGS_ATTR, None)
    if settings is None:
        settings = Settings.from_app(app)
        setattr(app, _SETTINGS_ATTR, settings)
    return settings


def refresh_settings(app: Any) -> Settings:
    """Re-read and validate the settings of ``app`` (at worker start)."""
    settings = Settings.from_app(app)
    setattr(app, _SETTINGS_ATTR, settings)
    return settings


def extensions_of(app: Any) -> list[Extension]:
    """The task extensions features registered on ``app``, in order."""
    return list(getattr(app, _EXTENSIONS_ATTR, ()))


def add_extension(app: Any, extension: Extension) -> None:
    """Register a task extension on ``app`` (features call this from their installer)."""
    current = getattr(app, _EXTENSIONS_ATTR, None)
    if current is None:
        current = []
        setattr(app, _EXTENSIONS_ATTR, current)
    if all(e.name != extension.name for e in current):
        current.append(extension)
        current.sort(key=lambda e: e.order)
