"""Settings: conversion, validation, environment overrides, typo detection; and a bad setting
stops a real worker at start with a message naming it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from celery import Celery

import celery_reliable
from celery_reliable import ConfigurationError, Settings
from celery_reliable.core.config import DEFAULT_DEAD_LETTER_MAX, DEFAULT_REDIS_URL
from tests.conftest import ROOT


def make(broker: str = "redis://127.0.0.1:1/3", **conf: object) -> Celery:
    app = Celery("settings-test", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


def settings(environ: dict[str, str] | None = None, **conf: object) -> Settings:
    return Settings.from_app(make(**conf), environ=environ or {})


def test_defaults_and_redis_url_from_a_redis_broker():
    s = settings()
    assert s.dead_letter_max == DEFAULT_DEAD_LETTER_MAX
    assert s.redis_url == "redis://127.0.0.1:1/3"
    amqp = Settings.from_app(make(broker="amqp://guest@127.0.0.1//"), environ={})
    assert amqp.redis_url == DEFAULT_REDIS_URL


def test_values_are_converted_to_their_types():
    s = settings(
        reliable_drain_timeout="40",
        reliable_dead_letter_max="7",
        reliable_metrics_port=9100,
        reliable_fail_open="off",
        reliable_embedded_reaper="yes",
    )
    assert s.drain_timeout == 40.0 and isinstance(s.drain_timeout, float)
    assert s.dead_letter_max == 7 and isinstance(s.dead_letter_max, int)
    assert s.metrics_port == 9100
    assert s.fail_open is False and s.embedded_reaper is True


def test_metrics_address_takes_addresses_and_host_names():
    assert settings().metrics_address == "0.0.0.0"
    for given, kept in [
        ("127.0.0.1", "127.0.0.1"),
        (" :: ", "::"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("localhost", "localhost"),
        ("metrics-1.internal.example", "metrics-1.internal.example"),
    ]:
        assert settings(reliable_metrics_address=given).metrics_address == kept
    env = {"CELERY_RELIABLE_METRICS_ADDRESS": "127.0.0.1"}
    assert settings(env).metrics_address == "127.0.0.1"


def test_environment_overrides_app_conf():
    env = {"CELERY_RELIABLE_DEAD_LETTER_MAX": "12", "CELERY_RELIABLE_KEY_PREFIX": "ops"}
    s = settings(env, reliable_dead_letter_max=5, reliable_key_prefix="app")
    assert s.dead_letter_max == 12 and s.key_prefix == "ops"
    # an empty variable does not override
    empty = settings({"CELERY_RELIABLE_DEAD_LETTER_MAX": ""}, reliable_dead_letter_max=5)
    assert empty.dead_letter_max == 5


@pytest.mark.parametrize(
    ("conf", "setting", "fragment"),
    [
        ({"reliable_drain_timeout": "soon"}, "reliable_drain_timeout", "expected a number"),
        ({"reliable_drain_timeout": 0}, "reliable_drain_timeout", "must be > 0"),
        ({"reliable_dead_letter_max": 2.5}, "reliable_dead_letter_max", "whole number"),
        ({"reliable_dead_letter_max": 0}, "reliable_dead_letter_max", ">= 1"),
        ({"reliable_max_recoveries": True}, "reliable_max_recoveries", "expected a number"),
        ({"reliable_metrics_port": 70000}, "reliable_metrics_port", "TCP port"),
        ({"reliable_fail_open": "maybe"}, "reliable_fail_open", "true or false"),
        ({"reliable_metrics_address": ""}, "reliable_metrics_address", "IP address"),
        ({"reliable_metrics_address": "a b"}, "reliable_metrics_address", "host name"),
        ({"reliable_metrics_address": "a..b"}, "reliable_metrics_address", "host name"),
        ({"reliable_metrics_address": 9808}, "reliable_metrics_address", "IP address"),
        ({"reliable_redis_url": "http://x"}, "reliable_redis_url", "redis://"),
        ({"reliable_key_prefix": "a{b}"}, "reliable_key_prefix", "braces"),
        (
            {"reliable_worker_timeout": 2, "reliable_heartbeat_interval": 2},
            "reliable_worker_timeout",
            "greater than reliable_heartbeat_interval",
        ),
    ],
)
def test_invalid_values_name_the_setting(conf, setting, fragment):
    with pytest.raises(ConfigurationError) as info:
        settings(**conf)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert fragment in str(info.value)


def test_invalid_environment_value_names_setting_and_variable():
    with pytest.raises(ConfigurationError) as info:
        settings({"CELERY_RELIABLE_WORKER_TIMEOUT": "abc"})
    assert info.value.setting == "reliable_worker_timeout"
    assert "CELERY_RELIABLE_WORKER_TIMEOUT" in str(info.value)


def test_unknown_settings_are_typos():
    with pytest.raises(ConfigurationError) as info:
        settings(reliable_dead_leter_max=10)
    assert info.value.setting == "reliable_dead_leter_max"
    assert "did you mean reliable_dead_letter_max?" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        settings({"CELERY_RELIABLE_DRAIN_TIMOUT": "5"})
    assert "CELERY_RELIABLE_DRAIN_TIMOUT" in str(info.value)
    assert "did you mean reliable_drain_timeout?" in str(info.value)


def test_install_validates_and_is_idempotent():
    app = make(reliable_dead_letter_max=3)
    first = celery_reliable.install(app)
    second = celery_reliable.install(app)
    assert first == second and first.dead_letter_max == 3
    steps = [s for s in app.steps["consumer"] if getattr(s, "label", "") == "reliable-bad-input"]
    assert len(steps) == 1
    with pytest.raises(ConfigurationError, match="reliable_drain_timeout"):
        celery_reliable.install(make(reliable_drain_timeout=-1))


def test_bad_setting_stops_a_real_worker_naming_it(ns):
    env = {**os.environ, **ns.env(), "CELERY_RELIABLE_WORKER_TIMEOUT": "abc"}
    cmd = [sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", "worker", "-c", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "reliable_worker_timeout" in output and "CELERY_RELIABLE_WORKER_TIMEOUT" in output
    assert "expected a number, got 'abc'" in output
