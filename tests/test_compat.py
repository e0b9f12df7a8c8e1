"""The private Celery/kombu/billiard/pybreaker touchpoints: all present, or install() fails.

Fast units (no worker): the version matrix (noxfile.py) runs this module against every
supported release, and the real-worker smoke tests there prove the touchpoints work.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.worker.request import Request
from kombu.asynchronous.hub import Hub
from kombu.asynchronous.semaphore import LaxBoundedSemaphore
from kombu.asynchronous.timer import Timer

import celery_reliable
from celery_reliable.core import compat
from celery_reliable.errors import IncompatibleVersion


def test_every_touchpoint_exists_in_the_installed_releases() -> None:
    assert compat.missing_touchpoints() == []


def test_every_touchpoint_names_its_user_and_the_releases_it_was_checked_in() -> None:
    names = [p.name for p in compat.TOUCHPOINTS]
    assert len(names) == len(set(names))
    for point in compat.TOUCHPOINTS:
        assert ":" not in point.name
        assert point.used_by and point.checked, point.name


def _app() -> Celery:
    return Celery("compat", broker="redis://127.0.0.1:1/0", set_as_current=False)


def test_install_fails_naming_a_missing_class_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Request, "_apply_result")
    with pytest.raises(
        IncompatibleVersion, match=r"celery\.worker\.request\.Request\._apply_result"
    ):
        celery_reliable.install(_app())


def test_install_fails_naming_an_attribute_the_constructor_no_longer_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def renamed(self: Any, value: int) -> None:
        self.initial_value = self.value = value
        self._waiters: list[Any] = []

    monkeypatch.setattr(LaxBoundedSemaphore, "__init__", renamed)
    with pytest.raises(IncompatibleVersion) as info:
        celery_reliable.install(_app())
    assert "LaxBoundedSemaphore._waiting" in str(info.value)
    assert "drain" in str(info.value)  # says what relies on it


def test_install_fails_naming_a_changed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    def fire_timers(self: Any, max_timers: int = 10) -> float:
        return 1.0

    monkeypatch.setattr(Hub, "fire_timers", fire_timers)
    with pytest.raises(IncompatibleVersion, match=r"Hub\.fire_timers\(min_delay\)"):
        celery_reliable.install(_app())


def test_a_touchpoint_of_a_newer_celery_is_not_required_of_an_older_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compat, "CELERY_VERSION", (5, 5))
    monkeypatch.delattr(Request, "_eta_timer_entry", raising=False)
    assert compat.missing_touchpoints() == []
    monkeypatch.setattr(compat, "CELERY_VERSION", (5, 7))
    assert "celery.worker.request.Request._eta_timer_entry" in compat.missing_touchpoints()


class _Req:
    """Stands in for a Celery Request in a timer entry's arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.message = object()
        self.acknowledged = False


def test_eta_requests_before_celery_5_7_are_read_from_the_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery < 5.7 keeps an ETA request only as a timer entry (``apply_eta_task(req)``,
    or ``limit_post_eta(req, bucket, 1)`` under a rate limit)."""
    monkeypatch.setattr(compat, "CELERY_VERSION", (5, 6))
    timer = Timer()
    eta, limited, done = _Req("eta"), _Req("limited"), _Req("cancelled")
    e1 = timer.call_after(30, lambda req: None, (eta,))
    e2 = timer.call_after(20, lambda req, bucket, n: None, (limited, object(), 1))
    timer.call_after(10, lambda req: None, (done,)).cancel()
    timer.call_after(5, lambda: None)  # a heartbeat or similar: no request
    timer.call_after(5, lambda n: None, (3,))
    found = dict((r.name, e) for r, e in compat.eta_requests(timer))
    assert found == {"eta": e1, "limited": e2}
