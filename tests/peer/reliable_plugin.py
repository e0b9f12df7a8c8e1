"""pytest plugin for Celery's own integration tests: every task a ReliableTask.

Loaded with ``-p reliable_plugin`` (the ``peer`` nox session does it for the
second run). Celery's ``celery_session_app`` fixture builds its app with
``celery.contrib.testing.app.TestApp``; this plugin wraps that factory so the app gets
``task_cls="celery_reliable:ReliableTask"`` (so ``@shared_task`` and ``@app.task`` build
ReliableTasks) and ``celery_reliable.install(app)``, exactly as a user would wire it.
"""

from __future__ import annotations

from typing import Any

import celery.contrib.testing.app as testing_app

import celery_reliable

#: The task base class every task of the app gets.
TASK_CLS = "celery_reliable:ReliableTask"

_original_test_app = testing_app.TestApp


def reliable_test_app(*args: Any, **kwargs: Any) -> Any:
    """Celery's TestApp with ReliableTask as the default base and install() applied."""
    kwargs.setdefault("task_cls", TASK_CLS)
    app = _original_test_app(*args, **kwargs)
    celery_reliable.install(app)
    return app


testing_app.TestApp = reliable_test_app


def pytest_report_header(config: Any) -> str:
    return f"celery_reliable: every task is a {TASK_CLS}, install(app) applied"
