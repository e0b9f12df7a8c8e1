"""``install(app)``: validate settings and wire the package into a Celery app.

Idempotent. Runs each feature's installer from :data:`FEATURES`, in order; each adds its
bootsteps, signal receivers and task extensions. Tasks that do not use
:class:`~celery_reliable.ReliableTask` are untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from . import admission, deadletters, drain, metrics, ordering, orphans
from .core.compat import check_touchpoints
from .core.config import Settings
from .core.state import refresh_settings

_INSTALLED_ATTR = "_celery_reliable_installed"
_lock = threading.Lock()

#: Every feature's installer ``(app) -> None``, in the order :func:`install` runs them.
FEATURES: tuple[tuple[str, Callable[[Any], None]], ...] = (
    ("deadletters", deadletters.install),
    ("orphans", orphans.install),
    ("drain", drain.install),
    ("ordering", ordering.install),
    ("admission", admission.install),
    ("metrics", metrics.install),
)


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
        IncompatibleVersion: an installed Celery/kombu/billiard/pybreaker release lacks a
            private part the package relies on; the message names each one.

    Examples:
        >>> app = Celery("shop", broker="redis://localhost:6379/0")
        >>> celery_reliable.install(app)
    """
    check_touchpoints()
    settings = Settings.from_app(app)
    with _lock:
        if getattr(app, _INSTALLED_ATTR, False):
            return settings
        app.steps["worker"].add(SettingsStep)
        for _name, installer in FEATURES:
            installer(app)
        setattr(app, _INSTALLED_ATTR, True)
    return settings
