"""The dead-letter store and ``dlq`` commands against hostile entries: corrupt stored
entries, malformed messages whose only copy of the arguments is their body, arguments too
large to keep, unknown tasks among replayable ones; and the ``--json`` contract of purge.
Entries are written by a real worker; the commands run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from celery_reliable import DeadLetterStore
from celery_reliable.deadletters.record import MAX_FIELD_CHARS
from celery_reliable.testing import wait_for
from tests.apps import basic
from tests.apps.common import events, recorder
from tests.conftest import ROOT
from tests.test_badinput import publish_raw, v2_headers
from tests.test_dlq_cli import cli


def test_corrupt_entries_are_listed_shown_refused_and_purgeable(ns, start_worker):
    """Before: one entry that was not JSON, lacked task/task_id or had a wrong-typed field
    made list, list --json, show and replay --all --dry-run crash with a traceback."""
    app = ns.app(basic.build)
    start_worker("basic")
    store = DeadLetterStore(app)
    good = app.tasks["basic.permanent"].delay(1)
    wait_for(lambda: store.count() == 1, 30, message="the real dead letter")
    corrupt = {
        "c-not-json": "{oops",
        "c-no-task": json.dumps({"id": "c-no-task", "reason": "max_retries"}),
        "c-wrong-type": json.dumps(
            {**store.get(good.id).to_dict(), "id": "c-wrong-type", "args": "not a list"}
        ),
        "c-not-object": "[1, 2]",
    }
    client = store.store.client
    for entry_id, raw in corrupt.items():
        client.hset(store.entries_key, entry_id, raw)
        client.zadd(store.index_key, {entry_id: time.time()})

    listed = json.loads(ok(cli(ns, "list", "--json")))
    by_id = {e["id"]: e for e in listed}
    assert set(by_id) == {good.id, *corrupt}
    assert by_id[good.id]["reason"] == "dead_letter_for"
    for entry_id, raw in corrupt.items():
        assert by_id[entry_id]["reason"] == "corrupt"
        assert f"dlq purge {entry_id}" in by_id[entry_id]["error"]
        assert by_id[entry_id]["body"] == raw
    text = ok(cli(ns, "list"))
    assert text.count("corrupt") >= len(corrupt) and good.id in text
    assert (
        "args is 'not a list', not list"
        in json.loads(ok(cli(ns, "show", "c-wrong-type", "--json")))["error"]
    )

    dry = cli(ns, "replay", "--all", "--dry-run", "--json")
    assert dry.returncode == 1 and "Traceback" not in dry.stderr
    report = json.loads(dry.stdout)
    assert [r["id"] for r in report["replayed"]] == [good.id]
    assert {r["id"] for r in report["refused"]} == set(corrupt)
    assert store.count() == 5

    assert json.loads(ok(cli(ns, "purge", *corrupt, "--yes", "--json"))) == {"purged": 4}
    assert [e.id for e in store.list(limit=None)] == [good.id]


def test_replay_all_replays_the_rest_and_reports_the_refused(ns, start_worker):
    """Before: one unknown-task entry made ``replay --all`` refuse every entry. Now the
    others are replayed, the refused ones are listed, kept, and the exit status is 1. A
    malformed entry is replayed with its original body's arguments, not with none."""
    app = ns.app(basic.build)
    start_worker("basic")
    store = DeadLetterStore(app)
    app.tasks["basic.until_fixed"].delay("k", 3)
    unknown = app.send_task("basic.not_registered", args=[1])
    poison = str(uuid.uuid4())  # a poison header, arguments [7] only in the body
    headers = {**v2_headers("basic.ok", poison), "timelimit": ["a", "b"]}
    publish_raw(ns, json.dumps([[7], {}, {}]).encode(), headers)
    unreadable = str(uuid.uuid4())  # a body that is no task body: nothing to replay
    publish_raw(ns, json.dumps(["a", "b", {}]).encode(), v2_headers("basic.ok", unreadable))
    wait_for(lambda: store.count() == 4, 30, message="4 dead letters")
    assert store.get(poison).reason == "malformed"
    recorder(app).set(basic.fixed_key(app, "k"), 1)

    done = cli(ns, "replay", "--all")
    assert done.returncode == 1, done.stderr
    assert "2 replayed" in done.stdout and "2 refused (kept in the store)" in done.stderr
    assert f"refused {unknown.id} (basic.not_registered)" in done.stderr
    assert f"refused {unreadable} (basic.ok): malformed message" in done.stderr
    assert sorted(e.id for e in store.list(limit=None)) == sorted([unknown.id, unreadable])

    def runs() -> dict[str, Any]:
        return {e["task"]: e for e in events(app, "succeeded")}

    wait_for(lambda: len(runs()) == 2, 30, message="the two replays to run")
    assert runs()["basic.ok"]["x"] == 7
    assert runs()["basic.until_fixed"]["key"] == "k" and runs()["basic.until_fixed"]["n"] == 3


def test_every_entry_is_capped_and_cut_arguments_are_not_replayed(ns, start_worker):
    """Before: an unknown-task dead letter kept arguments of any size (a 52 MB entry).
    Now arguments past reliable_max_payload_bytes are cut, the entry says so, and replay
    refuses it instead of sending a task without its arguments."""
    app = ns.app(basic.build, reliable_max_payload_bytes=100_000)
    start_worker("basic", env={"CELERY_RELIABLE_MAX_PAYLOAD_BYTES": "100000"})
    store = DeadLetterStore(app)
    huge = "x" * 3_000_000
    unknown = app.send_task("basic.not_registered", args=[huge])
    failed = app.send_task("basic.permanent", args=[1], kwargs={"note": huge})
    wait_for(lambda: store.count() == 2, 60, message="2 dead letters")
    for task_id in (unknown.id, failed.id):
        raw = store.store.client.hget(store.entries_key, task_id)
        assert len(raw) < 100_000 + 3 * MAX_FIELD_CHARS, len(raw)
        entry = store.get(task_id)
        assert {"args", "kwargs"} <= set(entry.truncated)
        assert entry.args == [] and entry.kwargs == {}
        assert entry.body and entry.body.endswith("...[truncated]")
    (refused,) = store.replay([failed.id])
    assert not refused.sent and "too large to keep" in (refused.refused or "")
    assert store.count() == 2


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def test_purge_keeps_stdout_for_json_and_refuses_without_a_terminal(ns, start_worker):
    """Before: ``purge --json`` printed its prompt before the JSON document on stdout, and
    ``purge --all`` with stdin closed printed a Python traceback."""
    app = ns.app(basic.build)
    start_worker("basic")
    store = DeadLetterStore(app)
    for n in range(2):
        app.tasks["basic.permanent"].delay(n)
    wait_for(lambda: store.count() == 2, 30, message="2 dead letters")

    command = ["-m", "celery", "-A", "tests.apps.basic:app", "reliable", "dlq", "purge"]
    closed = subprocess.run(
        [sys.executable, *command, "--all", "--json"],
        env={**os.environ, **ns.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(0),
    )
    assert closed.returncode == 1 and closed.stdout == ""
    assert "Traceback" not in closed.stderr and "pass --yes" in closed.stderr
    assert store.count() == 2

    asked = cli(ns, "purge", "--task", "basic.permanent", "--json", input="y\n")
    assert json.loads(ok(asked)) == {"purged": 2}  # stdout holds the document alone
    assert "There is no undo" in asked.stderr
