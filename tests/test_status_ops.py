"""What an operator reads: ``reliable status`` sections and the ``dlq`` text formats.

- status reads indexes only: with 100,000 dead letters it answers in under 0.5 s, and its
  dead-letter counts by reason and by exception type are exact;
- it shows the reaper's last pass, in-flight counts per worker, blocked ordering keys
  (and since when), and buckets that are throttling now;
- ``dlq show`` prints times as local date-times (``--json`` keeps Unix seconds), and the
  ERROR column of ``dlq list`` is cut at a word boundary with an ellipsis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.cli.dlq import cut
from celery_reliable.ordering.lines import lines_view
from celery_reliable.status import collect
from celery_reliable.testing import wait_for
from tests.apps import obs
from tests.apps.common import events
from tests.conftest import ROOT

#: The documented bound on ``status`` with a full store.
STATUS_SECONDS = 0.5


def reliable(ns: Any, *args: str) -> str:
    """``celery -A tests.apps.obs:app reliable ARGS`` in the test's namespace; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.obs:app", "reliable", *args],
        env={**os.environ, **ns.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def fill(store: DeadLetterStore, n: int) -> None:
    """Write ``n`` dead letters through the store's own script, 1,000 per pipeline."""
    from celery_reliable.deadletters.store import DLQ_ADD

    script = store.store.script(DLQ_ADD)
    client = store.store.client
    now = time.time()
    for start in range(0, n, 1000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 1000)):
                reason = ("max_retries", "dead_letter_for", "orphaned")[i % 3]
                exc = ("shop.UnknownSku", "builtins.ValueError")[i % 2]
                entry = DeadLetter(
                    id=f"dl-{i}",
                    task_id=f"dl-{i}",
                    task="shop.ship_order",
                    args=[i],
                    kwargs={},
                    reason=reason,
                    exception=exc,
                    error="x",
                    failed_at=now - n + i,
                )
                script(keys=store.script_keys(), args=store.add_args(entry), client=pipe)
            pipe.execute()


def test_status_with_100000_dead_letters_reads_counts_from_indexes_fast(ns):
    app = ns.app(obs.build, reliable_dead_letter_max=200_000)
    store = DeadLetterStore(app)
    fill(store, 100_000)
    collect(app)  # warm: scripts loaded, connections open
    started = time.perf_counter()
    report = collect(app)
    elapsed = time.perf_counter() - started
    dead = report["dead_letters"]
    assert dead["count"] == 100_000
    assert dead["by_reason"] == {
        "max_retries": 33_334,
        "dead_letter_for": 33_333,
        "orphaned": 33_333,
    }
    assert dead["by_exception"] == {"shop.UnknownSku": 50_000, "builtins.ValueError": 50_000}
    assert "uncounted" not in dead
    assert elapsed < STATUS_SECONDS, f"status took {elapsed:.3f}s"
    # removal keeps the counts exact
    assert store.purge([f"dl-{i}" for i in range(3)]) == 3
    dead = collect(app)["dead_letters"]
    assert dead["by_reason"]["max_retries"] == 33_333
    assert dead["by_exception"]["shop.UnknownSku"] == 49_998


def test_status_shows_last_pass_in_flight_blocked_keys_and_throttling(ns, start_worker):
    from celery_reliable.ordering.extension import assign_sequence
    from celery_reliable.orphans.reaper import Reaper

    app = ns.app(obs.build)
    start_worker("obs", concurrency=2)
    reaper = Reaper(app)
    try:
        reaper.note_pass(0.0042, reaper.run_pass())
    finally:
        reaper.close()
    # a slow task is in flight
    app.tasks["obs.slow"].delay(3.0)
    wait_for(lambda: events(app, "slow_started"), 20, message="the slow task to start")
    # a bucket with no token: the first start takes the only one for a minute
    app.tasks["obs.trickle"].delay(0)
    wait_for(lambda: events(app, "trickle"), 20, message="the trickle task")
    # an ordering key whose first place was taken but never published: the next one parks
    task = app.tasks["obs.ordered"]
    assign_sequence(app, task, ("blocked-key", 0), {}, {})
    task.delay("blocked-key", 1)
    wait_for(lambda: lines_view(app, 0.0).parked == 1, 20, message="a parked task")
    view = wait_for(
        lambda: lines_view(app, blocked_after=0.2).blocked and lines_view(app, 0.2),
        10,
        message="the key to count as blocked after 0.2 s",
    )
    assert [(b.group, b.key, b.parked, b.next_seq) for b in view.blocked] == [
        ("obs.ordered", "blocked-key", 1, 1)
    ]
    assert lines_view(app, blocked_after=3600).blocked == []

    report = collect(app)
    assert report["reaper"]["seconds"] == 0.0042 and report["reaper"]["last_pass"]
    [worker] = report["workers"]
    assert worker["in_flight"] == 1
    assert list(report["throttling"]) == ["obs.trickle"]
    assert report["throttling"]["obs.trickle"]["tokens"] < 1

    text = reliable(ns, "status")
    for section in ("workers", "reaper", "throttling", "blocked_keys", "dead_letters"):
        assert f"== {section}" in text


def test_dlq_show_prints_local_times_and_list_cuts_errors_at_a_word(ns, start_worker):
    app = ns.app(obs.build)
    start_worker("obs", concurrency=1)
    result = app.tasks["obs.bad"].delay(7)
    store = DeadLetterStore(app)
    wait_for(lambda: store.count() == 1, 30, message="the dead letter")
    entry = store.get(result.id)

    def cli(*args: str) -> str:
        return reliable(ns, "dlq", *args)

    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.failed_at))
    shown = cli("show", result.id)
    assert f"failed_at:      {local}" in shown
    assert json.loads(cli("show", result.id, "--json"))["failed_at"] == entry.failed_at
    listed = cli("list")
    row = next(line for line in listed.splitlines() if line.startswith(result.id))
    error = row.split("obs.bad", 1)[1].strip()
    assert error.endswith("…") and len(error) <= 60
    full = f"{entry.exception}: {entry.error}"
    assert full.startswith(error[:-1].rstrip())
    assert full[len(error) - 1] in " ,.;:"  # cut at a word boundary


def test_cut_keeps_short_text_and_cuts_long_text_at_a_word():
    assert cut("ValueError: short", 60) == "ValueError: short"
    assert cut("a\nb   c", 60) == "a b c"
    long = "ValueError: bad input 7: this sentence is long enough to be cut in a listing"
    assert cut(long, 40) == "ValueError: bad input 7: this sentence…"
    assert cut("x" * 80, 10) == "x" * 9 + "…"
