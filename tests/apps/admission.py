"""A test app for admission control: rate-limited, per-tenant and breaker-guarded tasks."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_reliable import ReliableTask
from celery_reliable.admission.extension import SLOT_HEADER
from tests.apps.common import install, make_app, record, recorder

#: Rate and burst of the shared bucket (the acceptance numbers of issue 5).
RATE, BURST = "20/s", 5
#: Per-tenant buckets.
TENANT_RATE, TENANT_BURST = "10/s", 2
#: The breaker of ``adm.vendor``.
FAIL_MAX, RESET_TIMEOUT, PROBE_LEASE = 4, 2.0, 3.0


class VendorDown(Exception):
    """The guarded dependency failed."""


class BadRequest(Exception):
    """A business error: excluded, it does not count against the breaker."""


def mode_key(app: Celery) -> str:
    return f"{app.conf.reliable_key_prefix}:test:vendor_mode"


def build(app: Celery) -> Celery:
    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="adm.limited",
        global_rate_limit=RATE,
        global_rate_burst=BURST,
    )
    def limited(self: Any, i: int) -> int:
        # the token slot a deferred copy held (Redis time, µs), to measure its lateness
        record(app, self, "started", i=i, slot=(self.request.headers or {}).get(SLOT_HEADER))
        return i

    @app.task(base=ReliableTask, bind=True, shared=False, name="adm.unlimited")
    def unlimited(self: Any, i: int) -> int:
        record(app, self, "started", i=i)
        return i

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="adm.tenant",
        global_rate_limit=TENANT_RATE,
        global_rate_burst=TENANT_BURST,
        global_rate_key="tenant",
    )
    def tenant(self: Any, tenant: str, i: int) -> int:
        record(app, self, "started", tenant=tenant, i=i)
        return i

    @app.task(
        base=ReliableTask,
        bind=True,
        shared=False,
        name="adm.vendor",
        breaker="vendor",
        breaker_fail_max=FAIL_MAX,
        breaker_reset_timeout=RESET_TIMEOUT,
        breaker_probe_lease=PROBE_LEASE,
        breaker_exclude=(BadRequest,),
    )
    def vendor(self: Any, i: int) -> int:
        """Behaves as the Redis key ``vendor_mode`` says: ``fail``, ``bad`` (excluded
        error), ``slow`` (1 s then success), ``hang`` (60 s) or anything else (success)."""
        mode = recorder(app).get(mode_key(app)) or "ok"
        record(app, self, "started", i=i, mode=mode)
        if mode == "fail":
            time.sleep(0.3)
            raise VendorDown(f"vendor down ({i})")
        if mode == "bad":
            raise BadRequest(f"bad request ({i})")
        if mode == "slow":
            time.sleep(1.0)
        if mode == "hang":
            time.sleep(60)
        record(app, self, "succeeded", i=i)
        return i

    if os.environ.get("CR_BAD_RATE"):  # a worker that must refuse to start

        @app.task(
            base=ReliableTask,
            bind=True,
            shared=False,
            name="adm.bad",
            global_rate_limit=os.environ["CR_BAD_RATE"],
        )
        def bad(self: Any) -> None: ...

    return app


app = install(build(make_app("admission"))) if "CR_BROKER_URL" in os.environ else None
