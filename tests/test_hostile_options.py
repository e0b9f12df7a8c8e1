"""Options, settings and ordering keys that are wrong in ways that used to pass silently:
NaN and infinity, a ``dead_letter_for`` that is no tuple of exception types, a typo in an
option name, and (group, key) pairs that shared one ordering line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from celery_reliable import ConfigurationError, ReliableTask
from celery_reliable.admission.breaker import BreakerSpec
from celery_reliable.core.config import Settings
from celery_reliable.ordering.extension import key_names, key_text
from celery_reliable.testing import wait_for
from tests.apps import hostile
from tests.apps.common import events
from tests.conftest import ROOT

DURATIONS = (
    "heartbeat_interval",
    "worker_timeout",
    "reaper_interval",
    "drain_timeout",
    "dead_letter_ttl",
    "ordering_gap_timeout",
)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308"])
@pytest.mark.parametrize("name", DURATIONS)
def test_durations_must_be_finite_and_bounded(name: str, value: str):
    """Before: NaN passed ``value < minimum``; inf and 1e308 were accepted, then made
    every ordered task fail with OverflowError (worker_timeout) or the dead-letter script
    fail after writing (dead_letter_ttl=nan), so the task ran twice."""
    variable = "CELERY_RELIABLE_" + name.upper()
    app = Celery("t", broker="redis://127.0.0.1:1/0", set_as_current=False)
    with pytest.raises(ConfigurationError) as info:
        Settings.from_app(app, environ={variable: value})
    assert info.value.setting == "reliable_" + name and variable in str(info.value)
    app.conf.update({"reliable_" + name: float(value)})
    with pytest.raises(ConfigurationError, match="reliable_" + name):
        Settings.from_app(app, environ={})


def test_counts_must_be_bounded():
    app = Celery("t", broker="redis://127.0.0.1:1/0", set_as_current=False)
    for name in ("dead_letter_max", "max_payload_bytes", "max_recoveries"):
        with pytest.raises(ConfigurationError, match="reliable_" + name):
            Settings.from_app(app, environ={"CELERY_RELIABLE_" + name.upper(): str(10**30)})


def define(**options: Any) -> Any:
    app = Celery("t", broker="redis://127.0.0.1:1/0", set_as_current=False)

    def charge(account: str) -> None: ...

    task = app.task(base=ReliableTask, shared=False, name="shop.charge", **options)(charge)
    return task._get_current_object()  # Celery defines the class lazily


@pytest.mark.parametrize(
    ("options", "option", "fragment"),
    [
        ({"dead_letter_for": ValueError}, "dead_letter_for", "write (ValueError,)"),
        ({"dead_letter_for": "ValueError"}, "dead_letter_for", "tuple of exception types"),
        ({"dead_letter_for": (42,)}, "dead_letter_for", "got (42,)"),
        ({"breaker_exclude": KeyError}, "breaker_exclude", "write (KeyError,)"),
        ({"dead_letter": "yes"}, "dead_letter", "True or False"),
        ({"ordering_kye": "account"}, "ordering_kye", "did you mean ordering_key?"),
        ({"breaker_fail_maxx": 3}, "breaker_fail_maxx", "did you mean breaker_fail_max?"),
        ({"max_retires": 3}, "max_retires", "did you mean max_retries?"),
        ({"global_rate": "1/s"}, "global_rate", "unknown option"),
    ],
)
def test_task_options_are_checked_where_the_task_is_defined(options, option, fragment):
    """Before: dead_letter_for=ValueError (or "ValueError", or (42,)) was accepted, then
    every failure raised TypeError and nothing was dead-lettered; typos were ignored."""
    with pytest.raises(ConfigurationError) as info:
        define(**options)
    head, _, rest = str(info.value).partition(": task 'shop.charge': ")
    assert (info.value.setting, head) == (option, option) and fragment in rest


def test_good_options_and_celerys_own_are_accepted():
    task = define(
        dead_letter_for=(ValueError, KeyError),
        breaker_exclude=[KeyError],
        max_retries=3,
        autoretry_for=(IOError,),
        retry_backoff=True,
        ordering_key="account",
    )
    assert task.dead_letter_for == (ValueError, KeyError)


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e308])
def test_breaker_reset_timeout_must_be_finite(value: float):
    task = define(breaker="payments", breaker_reset_timeout=value)
    with pytest.raises(ConfigurationError, match=r"breaker_reset_timeout: task 'shop\.charge'"):
        BreakerSpec.for_task(task)


def start_fails(ns: Any, **env: str) -> str:
    """Start a real worker of tests.apps.hostile; it must exit non-zero. Its output."""
    cmd = [sys.executable, "-m", "celery", "-A", "tests.apps.hostile:app", "worker", "-c", "1"]
    done = subprocess.run(
        cmd,
        env={**os.environ, **ns.env(**env)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_worker_will_not_start_with_nan_or_a_bad_option(ns):
    output = start_fails(ns, CELERY_RELIABLE_DEAD_LETTER_TTL="nan")
    assert "reliable_dead_letter_ttl: expected a finite number, got 'nan'" in output
    output = start_fails(ns, CR_BAD_OPTIONS="not_a_tuple")
    assert "dead_letter_for: task 'hostile.bad': expected a tuple of exception types" in output


# --------------------------------------------------------------------------- ordering keys


def test_ordering_key_names_never_collide(ns):
    store = type("S", (), {"key": staticmethod(lambda *parts: ":".join(parts))})()
    pairs = [("x", "a:b"), ("x:a", "b"), ("x:", "a:b"), ("", "x:a:b"), ("x:a:b", "")]
    names = {tuple(key_names(store, g, k)) for g, k in pairs}  # type: ignore[arg-type]
    assert len(names) == len(pairs)
    assert key_text(5) == key_text("5") == "5"
    assert key_text({"a": 1, "b": 2}) == key_text({"b": 2, "a": 1})
    assert key_text([1, "a"]) != key_text("[1, 'a']")


def test_different_groups_never_wait_for_each_other_and_equal_keys_share_a_line(ns, start_worker):
    """Before: group x with key "a:b" and group "x:a" with key "b" shared one line (one
    waited for the other), and two equal dicts in a different order were two lines."""
    app = ns.app(hostile.build)
    start_worker("hostile", concurrency=2)

    def ended(n: int) -> list[dict[str, Any]]:
        return wait_for(lambda: len(events(app, "ended")) >= n and events(app), 30)

    app.tasks["hostile.ordered_x"].delay("a:b", pause=3)
    app.tasks["hostile.ordered_xa"].delay("b")
    ended(2)
    first = [(e["event"], e["group"]) for e in events(app)]
    # x was published first and sleeps 3 s: on a shared line x:a could end only after x.
    # x:a ending first proves the lines are separate, whichever pool process started first.
    assert first.index(("ended", "x:a")) < first.index(("ended", "x")), first

    app.tasks["hostile.ordered_x"].delay({"a": 1, "b": 2}, pause=1)
    app.tasks["hostile.ordered_x"].delay({"b": 2, "a": 1})
    ended(4)
    second = [e["event"] for e in events(app)[4:]]
    assert second == ["started", "ended", "started", "ended"], second  # one at a time
