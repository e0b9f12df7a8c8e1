"""``install(app)``: validate settings and wire the package into a Celery app.

Idempotent. Adds consumer/worker bootsteps and signal receivers; tasks that do not use
:class:`~celery_reliable.ReliableTask` are untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from .config import Settings

if TYPE_CHECKING:
    from .extensions import TaskExtension

logger = logging.getLogger(__name__)

_INSTALLED_ATTR = "_celery_reliable_installed"
_SETTINGS_ATTR = "_celery_reliable_settings"
_EXTENSIONS_ATTR = "_celery_reliable_extensions"
_lock = threading.Lock()

#: Functions ``(app) -> None`` that features register to be run by :func:`install`.
_feature_installers: list[Callable[[Any], None]] = []


def feature(installer: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a feature's installer (run by :func:`install`, once per app)."""
    _feature_installers.append(installer)
    return installer


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


def extensions_of(app: Any) -> list[TaskExtension]:
    """The task extensions features registered on ``app``, in order."""
    return list(getattr(app, _EXTENSIONS_ATTR, ()))


def add_extension(app: Any, extension: TaskExtension) -> None:
    """Register a task extension on ``app`` (features call this from their installer)."""
    current = getattr(app, _EXTENSIONS_ATTR, None)
    if current is None:
        current = []
        setattr(app, _EXTENSIONS_ATTR, current)
    if all(e.name != extension.name for e in current):
        current.append(extension)
        current.sort(key=lambda e: e.order)


class SettingsStep(bootsteps.Step):  # type: ignore[misc]
    """Worker step: re-validate settings at worker start, so a bad value stops the worker
    with one clear message naming the setting (``app.conf`` may change after install)."""

    label = "reliable-settings"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        refresh_settings(worker.app)


def install(app: Any) -> Settings:
    """Wire celery_reliable into ``app``; safe to call more than once.

    Validates the ``reliable_*`` settings now (and again at worker start).

    Raises:
        ConfigurationError: a setting is invalid; the message names it.

    Examples:
        >>> app = Celery("shop", broker="redis://localhost:6379/0")
        >>> celery_reliable.install(app)
    """
    settings = Settings.from_app(app)
    with _lock:
        if getattr(app, _INSTALLED_ATTR, False):
            return settings
        from . import features  # noqa: F401  (registers the feature installers)
        from .badinput import BadInputStep

        app.steps["worker"].add(SettingsStep)
        app.steps["consumer"].add(BadInputStep)
        for installer in _feature_installers:
            installer(app)
        setattr(app, _INSTALLED_ATTR, True)
    return settings
