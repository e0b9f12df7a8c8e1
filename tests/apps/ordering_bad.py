"""A test app whose ordered task names a parameter it does not have: workers must refuse
to start, naming the option."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from tests.apps.common import install, make_app


def build(app: Celery) -> Celery:
    @app.task(base=ReliableTask, shared=False, name="bad.key", ordering_key="acount_id")
    def bad_key(account_id: str) -> Any: ...

    return app


app = install(build(make_app("ordering_bad"))) if "CR_BROKER_URL" in os.environ else None
