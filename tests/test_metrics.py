"""Prometheus metrics: one endpoint per worker summing every pool process."""

from __future__ import annotations

import urllib.request

from celery_reliable.testing import free_port, wait_for
from tests.apps import basic
from tests.apps.common import events


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("celery_reliable_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_worker_serves_task_and_dead_letter_counts_of_all_pool_processes(ns, start_worker):
    app = ns.app(basic.build)
    port = free_port()
    start_worker("basic", concurrency=2, env={"CELERY_RELIABLE_METRICS_PORT": str(port)})
    for i in range(30):
        app.tasks["basic.ok"].delay(i)
    app.tasks["basic.permanent"].delay(1)
    wait_for(lambda: len(events(app, "succeeded")) == 30, 30, message="30 successes")
    ok = 'celery_reliable_tasks_total{outcome="succeeded",task="basic.ok"}'
    dead = 'celery_reliable_dead_letters_total{reason="dead_letter_for",task="basic.permanent"}'
    failed = 'celery_reliable_tasks_total{outcome="failed",task="basic.permanent"}'
    # the dead letter is counted when it is written, the outcome after the run's last hook
    wait_for(
        lambda: (s := scrape(port)).get(ok) == 30 and s.get(dead) == 1 and s.get(failed) == 1,
        20,
        message=lambda: f"metrics to show 30 successes, 1 dead letter, 1 failure: {scrape(port)}",
    )
    pids = {e["pid"] for e in events(app, "succeeded")}
    assert len(pids) >= 1  # the sum is over whichever pool processes ran them
