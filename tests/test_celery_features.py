"""Celery features keep working through ReliableTask (defects found by Celery's own
integration tests run with every task a ReliableTask; see docs/testing.md)."""

from __future__ import annotations

import uuid

import pytest

from celery_reliable import DeadLetterStore
from celery_reliable.admission.extension import COPY_HEADER, copy_key, started_copy_key
from celery_reliable.core import compat
from celery_reliable.core.store import store_for
from celery_reliable.testing import wait_for
from tests.apps import celeryfeatures
from tests.apps.common import events


@pytest.mark.skipif(
    compat.CELERY_VERSION < compat.PYDANTIC_DUMP_SINCE,
    reason="Celery < 5.7 does not dump pydantic models at publish (a plain Task fails too)",
)
def test_pydantic_task_takes_model_arguments(ns, start_worker):
    """apply_async sizes the arguments as Celery sends them (models dumped), so calling a
    pydantic=True ReliableTask with a model works as it does for a plain Task."""
    app = ns.app(celeryfeatures.build)
    start_worker("celeryfeatures")
    pair = celeryfeatures.Pair
    app.tasks["cf.add_pair"].delay(pair(x=1, y=2))
    app.tasks["cf.add_pair"].apply_async(kwargs={"pair": pair(x=3, y=4)})
    app.tasks["cf.add_pair"].s(pair(x=5, y=6)).delay()
    added = wait_for(
        lambda: (e := events(app, "added")) and len(e) >= 3 and e,
        20,
        message=lambda: f"3 runs of cf.add_pair, got {events(app)}",
    )
    assert sorted(e["total"] for e in added) == [3, 7, 11]
    assert {e["kind"] for e in added} == {"Pair"}  # validated back into the model


def test_replace_in_a_rate_limited_task_runs_after_the_task_was_deferred(ns, start_worker):
    """Task.replace() reuses the task id: the replacement of a copy that admission control
    had deferred is a new task, not a stale copy of the old one, and runs."""
    app = ns.app(celeryfeatures.build)
    start_worker("celeryfeatures", concurrency=2)
    ids = [app.tasks["cf.step"].delay(1).id for _ in range(3)]
    done = wait_for(
        lambda: (d := {e["id"] for e in events(app, "done")}) >= set(ids) and d,
        30,
        message=lambda: f"every chain to end; events: {events(app)}",
    )
    assert done == set(ids)
    finished = [e["id"] for e in events(app, "done")]
    assert sorted(finished) == sorted(ids)  # each replacement ran exactly once
    assert DeadLetterStore(app).count() == 0


def test_a_stale_copy_is_dead_lettered_not_dropped_silently(ns, start_worker):
    """A message admission control drops as an older copy of a deferred task leaves a dead
    letter (reason ``stale_copy``) that names the task, instead of only a log line."""
    app = ns.app(celeryfeatures.build)
    start_worker("celeryfeatures")
    task_id = uuid.uuid4().hex
    store = store_for(app)
    # A newer copy of this task id was deferred and has started: this message is the old one.
    store.client.set(copy_key(store, task_id), "newer-copy-token", ex=600)
    store.client.set(started_copy_key(store, task_id), "newer-copy-token", ex=600)
    app.tasks["cf.step"].apply_async((0,), task_id=task_id)
    dlq = DeadLetterStore(app)
    wait_for(lambda: dlq.count() == 1, 20, message="the stale copy's dead letter")
    (entry,) = dlq.list()
    assert entry.task_id == task_id and entry.task == "cf.step"
    assert entry.reason == "stale_copy"
    assert entry.args == [0]
    assert not [e for e in events(app, "started") if e["id"] == task_id]  # it did not run


def test_a_message_whose_recorded_copy_never_started_runs(ns, start_worker):
    """A deferral records its copy before publishing it; a kill -9 in between leaves a
    record and no copy. The original message, redelivered, must run (not be dropped as
    stale): then a copy that was published after all is the one dropped."""
    app = ns.app(celeryfeatures.build)
    start_worker("celeryfeatures")
    task_id = uuid.uuid4().hex
    store = store_for(app)
    store.client.set(copy_key(store, task_id), "unpublished-copy", ex=600)
    app.tasks["cf.step"].apply_async((0,), task_id=task_id)
    wait_for(
        lambda: [e for e in events(app, "done") if e["id"] == task_id],
        20,
        message="the original message to run in place of its unpublished copy",
    )
    # the copy turns up after all: it is the stale one now, and never runs
    app.tasks["cf.step"].apply_async(
        (0,), task_id=task_id, headers={COPY_HEADER: "unpublished-copy"}
    )
    dlq = DeadLetterStore(app)
    wait_for(lambda: dlq.count() == 1, 20, message="the late copy's stale_copy dead letter")
    assert dlq.list()[0].reason == "stale_copy"
    assert len([e for e in events(app, "done") if e["id"] == task_id]) == 1
