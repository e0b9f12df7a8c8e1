"""Pure parts of admission control: option parsing and validation, and the two Lua
scripts run directly against the session's private Redis."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import pytest
from celery import Celery

import celery_reliable
from celery_reliable import ConfigurationError, ReliableTask, Settings
from celery_reliable.admission.breaker import BreakerSpec, outcome_kind
from celery_reliable.admission.extension import (
    breaker_index_key,
    breaker_key,
    bucket_index_key,
    bucket_key,
    copy_key,
    started_copy_key,
    validate_tasks,
)
from celery_reliable.admission.ratelimit import BucketSpec, default_burst, parse_rate
from celery_reliable.admission.scripts import ADMIT, BREAKER_REPORT
from celery_reliable.core.store import RedisStore

US = 1_000_000


@pytest.mark.parametrize(
    ("text", "rate"), [("100/s", 100.0), ("30/m", 0.5), ("36/h", 0.01), (" 2.5 / s ", 2.5)]
)
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["100", "10/d", "0/s", "-1/s", "abc", 10, None])
def test_parse_rate_rejects(text: Any) -> None:
    with pytest.raises(ConfigurationError, match="global_rate_limit"):
        parse_rate(text, task="t.x")


def test_default_burst_is_one_seconds_worth_at_least_one() -> None:
    assert default_burst(20.0) == 20
    assert default_burst(0.5) == 1


def make_app(**options: Any) -> Celery:
    app = Celery("units", broker="memory://", set_as_current=False)
    app.conf.reliable_redis_url = "redis://127.0.0.1:1/0"
    celery_reliable.install(app)

    @app.task(base=ReliableTask, bind=True, shared=False, name="units.t", **options)
    def t(self: Any, tenant: str, n: int = 0) -> None: ...

    return app


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"global_rate_limit": "fast"}, "global_rate_limit"),
        ({"global_rate_limit": "1/s", "global_rate_burst": 0}, "global_rate_burst"),
        ({"global_rate_burst": 3}, "global_rate_burst"),
        ({"global_rate_limit": "1/s", "global_rate_key": "nope"}, "global_rate_key"),
        ({"global_rate_limit": "1/s", "global_rate_key": 3}, "global_rate_key"),
        ({"breaker": "a b"}, "breaker"),
        ({"breaker": "b", "breaker_fail_max": 0}, "breaker_fail_max"),
        ({"breaker": "b", "breaker_reset_timeout": -1}, "breaker_reset_timeout"),
        ({"breaker": "b", "breaker_exclude": ("x",)}, "breaker_exclude"),
    ],
)
def test_bad_options_fail_validation_naming_option_and_task(
    options: dict[str, Any], option: str
) -> None:
    app = make_app(**options)
    with pytest.raises(ConfigurationError, match=rf"^{option}: task 'units.t'"):
        validate_tasks(app)


def test_specs_and_per_key_bucket_names() -> None:
    app = make_app(global_rate_limit="20/s", global_rate_key="tenant", breaker="vendor")
    app.finalize()
    task = app.tasks["units.t"]
    bucket = BucketSpec.for_task(task)
    assert bucket is not None and bucket.interval_us == 50_000 and bucket.burst == 20
    assert bucket.bucket_name(("a",), {}, task) == "key:a"
    assert bucket.bucket_name((), {"tenant": "b"}, task) == "key:b"
    spec = BreakerSpec.for_task(task)
    assert spec is not None and (spec.fail_max, spec.reset_timeout) == (5, 30.0)


def test_outcomes_count_like_pybreaker() -> None:
    from celery.exceptions import Retry

    spec = BreakerSpec("units-outcome", 2, 1.0, (KeyError,), 1.0)
    assert outcome_kind(spec, None, "succeeded") == "success"
    assert outcome_kind(spec, OSError("x"), "failed") == "failure"
    assert outcome_kind(spec, KeyError("x"), "failed") == "success"  # excluded
    assert outcome_kind(spec, Retry(exc=OSError("x")), "retry") == "failure"
    assert outcome_kind(spec, Retry(), "retry") == "release"
    assert outcome_kind(spec, None, "deferred") == "release"


# --- the scripts, on a real Redis ---


@pytest.fixture
def store(reliable_redis_server: Any) -> RedisStore:
    if not reliable_redis_server.running:
        reliable_redis_server.start()
    settings = Settings(
        redis_url=reliable_redis_server.url(2), key_prefix=f"u{uuid.uuid4().hex[:8]}"
    )
    return RedisStore(settings)


def admit(
    store: RedisStore, bucket: str | None, breaker: str | None, task_id: str, **kw: Any
) -> Any:
    keys = [copy_key(store, task_id), started_copy_key(store, task_id)]
    argv: list[Any] = [
        "0",
        0,
        0,
        kw.get("held", 0),
        "0",
        0,
        0,
        task_id,
        300 * US,
        US,
        kw.get("copy", ""),
        kw.get("short", 0),
        bucket or "",
        600 * US,
    ]
    if bucket:
        keys += [bucket_key(store, bucket), bucket_index_key(store)]
        argv[0:3] = ["1", kw.get("interval", 100_000), kw.get("burst", 2)]
    if breaker:
        keys.append(breaker_key(store, breaker))
        argv[4:7] = ["1", int(kw.get("reset", 0.2) * US), int(kw.get("lease", 0.2) * US)]
    return store.run(ADMIT, keys, argv)


def report(store: RedisStore, breaker: str, kind: str, task_id: str, fail_max: int = 2) -> Any:
    keys = [breaker_key(store, breaker), breaker_index_key(store)]
    return store.run(BREAKER_REPORT, keys, [kind, task_id, fail_max, breaker])


def test_bucket_reserves_consecutive_slots_one_interval_apart(store: RedisStore) -> None:
    replies = [admit(store, "b", None, f"t{i}") for i in range(5)]
    assert [r[0] for r in replies] == ["run", "run", "bucket", "bucket", "bucket"]
    slots = [r[2] for r in replies[2:]]
    assert [b - a for a, b in itertools.pairwise(slots)] == [100_000, 100_000]
    assert 0 < replies[2][1] <= 100_000
    # a copy holding a slot is told to wait while early, and runs once its slot is due
    early = admit(store, "b", None, "t4", held=slots[-1])
    assert early[0] == "bucket" and early[2] == slots[-1]
    # due, but two tasks just started: actual starts stay within rate + burst, so it waits
    # a little more, keeping its slot
    past = int(time.time() * US) - 1
    late = admit(store, "b", None, "t4", held=past)
    assert late[0] == "bucket" and late[2] == past and 0 < late[1] <= 100_000
    time.sleep(late[1] / US + 0.01)
    assert admit(store, "b", None, "t4", held=past)[0] == "run"


def test_late_copies_do_not_bunch_beyond_the_burst(store: RedisStore) -> None:
    past = int(time.time() * US) - 2 * US  # five copies whose slots passed long ago
    replies = [admit(store, "late", None, f"t{i}", held=past, burst=2) for i in range(5)]
    assert [r[0] for r in replies] == ["run", "run", "bucket", "bucket", "bucket"]


def test_stale_copy_is_dropped_once_the_newest_copy_started(store: RedisStore) -> None:
    store.client.set(copy_key(store, "t1"), "newest", ex=600)
    first = admit(store, "b", None, "t1", copy="newest")
    assert first[0] == "run" and first[7] == 0  # the copy itself starts
    assert admit(store, "b", None, "t1", copy="")[0] == "stale"
    assert admit(store, "b", None, "t1", copy="older")[0] == "stale"
    assert admit(store, "b", None, "t1", copy="newest")[0] == "run"  # a redelivery of it


def test_older_message_takes_the_place_of_a_copy_that_never_started(store: RedisStore) -> None:
    """A deferral recorded copy "new" and crashed, maybe before publishing it: the older
    message that comes back runs (claimed), and the copy, should it arrive, is stale."""
    store.client.set(copy_key(store, "t2"), "new", ex=600)
    older = admit(store, None, None, "t2", copy="")
    assert older[0] == "run" and older[7] == 1
    assert admit(store, None, None, "t2", copy="new")[0] == "stale"
    assert admit(store, None, None, "t2", copy="")[0] == "run"  # a redelivery of the owner
    assert 0 < store.client.pttl(started_copy_key(store, "t2")) <= 600_000


def test_first_publish_writes_nothing_for_copies(store: RedisStore) -> None:
    assert admit(store, None, None, "t3")[0] == "run"
    assert not store.client.exists(copy_key(store, "t3"), started_copy_key(store, "t3"))


def test_breaker_single_probe_with_lease(store: RedisStore) -> None:
    assert admit(store, None, "v", "a")[0] == "run"
    assert report(store, "v", "failure", "a")[3] == ""
    assert report(store, "v", "failure", "b")[3] == "open"
    denied = admit(store, None, "v", "c")
    assert denied[0] == "breaker" and denied[3] == "open" and 0 < denied[1] <= 200_000
    time.sleep(0.25)  # the reset timeout of this breaker (0.2 s), in real Redis time
    probe = admit(store, None, "v", "c")
    assert probe[0] == "run" and probe[4] == 1 and probe[6] == "half-open"
    assert admit(store, None, "v", "d")[0] == "breaker"  # one probe only
    time.sleep(0.25)  # the probe's lease (0.2 s) ran out: its worker is presumed dead
    second = admit(store, None, "v", "d")
    assert second[0] == "run" and second[4] == 1
    assert report(store, "v", "success", "c")[3] == ""  # the expired probe has no say
    assert report(store, "v", "failure", "d")[3] == "open"  # failed probe re-opens
    time.sleep(0.25)
    assert admit(store, None, "v", "e")[4] == 1
    assert report(store, "v", "success", "e")[:2] == ["closed", 0]


def test_breaker_probe_not_granted_when_the_bucket_defers(store: RedisStore) -> None:
    report(store, "v2", "failure", "a")
    report(store, "v2", "failure", "a")
    time.sleep(0.25)
    assert admit(store, "b2", "v2", "x", burst=1)[0] == "run"  # probe, and the only token
    report(store, "v2", "release", "x")
    r = admit(store, "b2", "v2", "y", burst=1)
    assert r[0] == "bucket"
    assert store.client.hget(breaker_key(store, "v2"), "probe") is None
