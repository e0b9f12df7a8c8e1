"""`celery -A APP reliable dlq list|show|replay|purge`, run as real subprocesses against
dead letters that real workers wrote; and replay running the task again on a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from celery_reliable import DeadLetterStore
from celery_reliable.testing import free_port, wait_for
from tests.apps import basic
from tests.apps.common import events, make_app, recorder
from tests.conftest import ROOT


def celery(
    ns: Any, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A tests.apps.basic:app ARGS`` in a subprocess, in the test's namespace."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", *args],
        env={**os.environ, **ns.env(**env)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
    )


def cli(ns: Any, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``celery -A tests.apps.basic:app reliable dlq ARGS``."""
    return celery(ns, "reliable", "dlq", *args, input=input)


def ok_json(ns: Any, *args: str) -> Any:
    """Run a ``--json`` command; it must succeed and print exactly one JSON document."""
    done = cli(ns, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # raises on anything but one document


def fail_one_by_one(app: Any, store: DeadLetterStore, calls: list[tuple[str, tuple]]) -> list[str]:
    """Publish failing tasks one at a time (so failed_at orders them); return their ids."""
    ids = []
    for name, args in calls:
        ids.append(app.tasks[name].delay(*args).id)
        expected = len(ids)
        wait_for(lambda: store.count() == expected, 30, message=f"{expected} dead letters")  # noqa: B023
    return ids


def test_list_and_show_with_and_without_json(ns, start_worker):
    app = ns.app(basic.build)
    start_worker("basic", concurrency=1)
    store = DeadLetterStore(app)
    p1, q1, p2, p3 = fail_one_by_one(
        app,
        store,
        [
            ("basic.permanent", (1,)),
            ("basic.until_fixed", ("k",)),
            ("basic.permanent", (2,)),
            ("basic.permanent", (3,)),
        ],
    )

    listed = ok_json(ns, "list")
    assert isinstance(listed, list)
    assert [e["id"] for e in listed] == [p3, p2, q1, p1]  # newest first
    assert listed[0] == store.get(p3).to_dict()

    only = ok_json(ns, "list", "--task", "basic.permanent", "--limit", "2")
    assert [e["id"] for e in only] == [p3, p2]

    text = cli(ns, "list", "--limit", "3")
    assert text.returncode == 0, text.stderr
    assert "REASON" in text.stdout and "dead_letter_for" in text.stdout
    assert [line.split()[0] for line in text.stdout.splitlines()[1:4]] == [p3, p2, q1]
    assert "3 shown, 4 stored, 0 dropped (capacity), 0 expired (ttl)" in text.stdout

    shown = ok_json(ns, "show", q1)
    assert isinstance(shown, dict)
    assert shown == store.get(q1).to_dict()
    assert shown["task"] == "basic.until_fixed" and shown["args"] == ["k"]
    assert "PermanentError" in shown["traceback"]

    text = cli(ns, "show", q1)
    assert text.returncode == 0
    assert f"id:             {q1}" in text.stdout
    assert "traceback:" in text.stdout and "k is not fixed yet" in text.stdout

    missing = cli(ns, "show", "no-such-id")
    assert missing.returncode != 0
    assert "no dead letter with id 'no-such-id'" in missing.stderr
    empty = ok_json(ns, "list", "--task", "basic.nothing")
    assert empty == []

    status = celery(ns, "reliable", "status", "--json")
    assert status.returncode == 0, status.stderr
    counters = json.loads(status.stdout)["dead_letters"]
    assert counters == {
        "added": 4,
        "count": 4,
        "dropped": 0,
        "expired": 0,
        "by_reason": {"dead_letter_for": 4},
        "by_exception": {"tests.apps.basic.PermanentError": 4},
    }


def test_replay_and_purge_from_the_cli(ns, start_worker):
    app = ns.app(basic.build)
    start_worker("basic", concurrency=1)
    store = DeadLetterStore(app)
    a, b, c, d, e = fail_one_by_one(
        app,
        store,
        [
            ("basic.until_fixed", ("a",)),
            ("basic.until_fixed", ("b",)),
            ("basic.until_fixed", ("c",)),
            ("basic.permanent", (1,)),
            ("basic.permanent", (2,)),
        ],
    )
    # no selection, or two selections, is a usage error
    for args in (("replay",), ("purge", "--yes"), ("replay", a, "--all")):
        bad = cli(ns, *args)
        assert bad.returncode == 2 and "exactly one" in bad.stderr, bad.stderr
    unknown = cli(ns, "replay", "nope")
    assert unknown.returncode == 1 and "no dead letter with id 'nope'" in unknown.stderr

    # --dry-run sends nothing and keeps every entry
    dry = ok_json(ns, "replay", "--task", "basic.until_fixed", "--dry-run")
    assert dry["dry_run"] is True
    assert {r["id"] for r in dry["replayed"]} == {a, b, c}
    assert not any(r["sent"] for r in dry["replayed"])
    assert store.count() == 5

    for key in ("a", "b", "c"):
        recorder(app).set(basic.fixed_key(app, key), 1)
    one = ok_json(ns, "replay", a)
    assert [r["id"] for r in one["replayed"]] == [a] and one["replayed"][0]["sent"]
    many = ok_json(ns, "replay", "--task", "basic.until_fixed")
    assert many["interrupted"] is False and all(r["sent"] for r in many["replayed"])
    replayed = {a: one["replayed"][0]["new_task_id"]}
    replayed.update({r["id"]: r["new_task_id"] for r in many["replayed"]})
    assert set(replayed) == {a, b, c}

    def successes() -> dict[str, str]:
        return {ev["id"]: ev["replayed_from"] for ev in events(app, "succeeded")}

    wait_for(lambda: len(successes()) == 3, 30, message="three replayed tasks to succeed")
    assert successes() == {new: old for old, new in replayed.items()}
    assert [x.id for x in store.list(limit=None)] == [e, d]

    # purge: without --yes it asks, and "n" keeps everything
    asked = cli(ns, "purge", d, input="n\n")
    assert asked.returncode != 0 and store.count() == 2
    assert ok_json(ns, "purge", d, "--yes") == {"purged": 1}
    assert cli(ns, "purge", "--task", "basic.permanent", "--yes").stdout.strip() == "purged 1"
    assert store.count() == 0
    fail_one_by_one(app, store, [("basic.permanent", (3,)), ("basic.flaky", (4,))])
    assert ok_json(ns, "purge", "--all", "--yes") == {"purged": 2}
    assert store.count() == 0


def test_replay_runs_the_task_again_with_a_new_id_and_removes_the_entry(
    ns, start_worker, reliable_dead_letters
):
    app = ns.app(basic.build)
    start_worker("basic")
    store = DeadLetterStore(app)
    first = app.tasks["basic.until_fixed"].apply_async(("x",), headers={"x-tenant": "t1"})
    entry = reliable_dead_letters.wait(app, first.id, reason="dead_letter_for")
    assert entry.headers == {"x-tenant": "t1"}
    with pytest.raises(AssertionError, match="reason 'dead_letter_for', not 'max_retries'"):
        reliable_dead_letters.wait(app, first.id, reason="max_retries", timeout=1)
    recorder(app).set(basic.fixed_key(app, "x"), 1)

    (done,) = store.replay([first.id])
    assert done.entry_id == first.id and done.sent and done.new_task_id != first.id
    reliable_dead_letters.assert_none(app)
    wait_for(lambda: events(app, "succeeded"), 30, message="the replayed run")
    (ok,) = events(app, "succeeded")
    assert ok["id"] == done.new_task_id
    assert ok["replayed_from"] == first.id
    assert ok["tenant"] == "t1"  # custom headers travel with the replay
    # exactly two runs in all: the failed original and the replay
    assert [ev["id"] for ev in events(app, "started")] == [first.id, done.new_task_id]
    assert store.stats()["added"] == 1


def test_replay_that_cannot_publish_keeps_the_entry(ns, start_worker):
    """The entry is removed only after its publish succeeded: with the broker unreachable,
    replay raises and the dead letter is still there."""
    app = ns.app(basic.build)
    start_worker("basic")
    store = DeadLetterStore(app)
    failed = app.tasks["basic.permanent"].delay(9)
    wait_for(lambda: store.count() == 1, 30, message="the dead letter")

    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    offline = basic.build(
        make_app(
            "offline",
            dead_broker,
            ns.redis_url,
            ns.prefix,
            ns.queue,
            broker_transport_options={"max_retries": 1},
            broker_connection_timeout=0.5,
        )
    )
    offline.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
    with pytest.raises(OperationalError, match="Connection refused"):
        DeadLetterStore(offline).replay([failed.id])
    assert store.get(failed.id).task == "basic.permanent"


def test_unreachable_store_is_one_clear_error(ns):
    down = f"redis://:secret@127.0.0.1:{free_port()}/1"
    done = celery(ns, "reliable", "dlq", "list", CR_REDIS_URL=down)
    assert done.returncode == 1
    assert "Error: dead-letter store at redis://:**@127.0.0.1:" in done.stderr
    assert "Connection refused" in done.stderr
    assert "secret" not in done.stderr and "Traceback" not in done.stderr
