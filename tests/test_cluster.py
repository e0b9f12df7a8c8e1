"""Every feature against a real three-master Redis Cluster as the coordination store.

The broker stays the session's plain redis-server (kombu has no cluster transport); the
store is ``redis+cluster://`` over three ``redis-server --cluster-enabled yes`` nodes that
``redis-cli --cluster create`` joined (the ``reliable_redis_cluster`` fixture). Each test
here is one of the suite's real-worker tests, run unchanged with the store moved to the
cluster (the module's ``ns`` fixture), in its quickest form: dead letters, reaper after
kill -9, drain, ordering (start, hand-off and the sweep), breaker; and smoke tests of the
rate limit, ``status`` and the dlq CLI. Select them with ``pytest -m cluster``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from celery_reliable import DeadLetterStore, Settings
from celery_reliable.core.store import STORE_ERRORS, RedisStore, store_for
from celery_reliable.ordering.extension import index_key, key_names
from celery_reliable.ordering.scripts import ORD_START, ORD_SWEEP
from celery_reliable.status import collect
from celery_reliable.testing import RedisClusterServers, RedisServer, wait_for
from tests import (
    test_breaker,
    test_deadletter,
    test_dlq_cli,
    test_drain,
    test_ordering,
    test_orphans,
    test_rate_limit,
)
from tests.apps import admission, basic
from tests.apps.common import events
from tests.conftest import ROOT, Namespace, new_namespace

pytestmark = pytest.mark.cluster


@pytest.fixture
def ns(
    reliable_redis_server: RedisServer, reliable_redis_cluster: RedisClusterServers
) -> Namespace:
    """The suite's namespace, with the store on the cluster."""
    return new_namespace(reliable_redis_server, reliable_redis_cluster.url())


start_reaper = test_orphans.start_reaper

test_cluster_dead_letters = (
    test_deadletter.test_exhausted_retries_are_dead_lettered_with_every_field
)
test_cluster_reaper_after_kill9 = test_orphans.test_orphan_is_rerun_within_worker_timeout
test_cluster_drain = (
    test_drain.test_sigterm_returns_prefetched_within_a_second_and_waits_for_running
)
test_cluster_ordering = test_ordering.test_interleaved_keys_never_overlap_and_start_in_order
test_cluster_ordering_sweep = test_ordering.test_sweep_redoes_a_lost_hand_off_and_forgets_idle_keys
test_cluster_breaker = (
    test_breaker.test_breaker_opens_cluster_wide_lets_one_probe_closes_and_reopens
)


def test_cluster_store_is_a_cluster_client_and_spreads_per_line_keys(ns):
    app = ns.app(basic.build)
    store = store_for(app)
    assert store.is_cluster
    client: Any = store.client

    slots = {client.keyslot(key_names(store, "g", f"k{i}")[0]) for i in range(50)}
    owners = {client.get_node_from_key(key_names(store, "g", f"k{i}")[0]).port for i in range(50)}
    assert len(slots) > 40 and len(owners) == 3, "ordering lines spread over every node"


def status_cli(ns: Namespace, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.apps.basic:app", "reliable", "status", *args],
        env={**os.environ, **ns.env(**env)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cluster_rate_limit(ns, start_worker):
    """The bucket's script on the cluster: a shared 20/s bucket (burst 5) over two workers
    never lets more than rate + burst start in any second, and every task starts once.
    (Achieved throughput is the standalone test's business; it depends on the load.)"""
    app = ns.app(admission.build)
    test_rate_limit.start_two_workers(start_worker)
    ids = [app.tasks["adm.limited"].delay(i).id for i in range(60)]
    wait_for(lambda: len(events(app, "started")) >= 60, 60, message="60 starts")
    starts = test_rate_limit.starts_by_id(app, "adm.limited")
    assert sorted(starts) == sorted(ids) and all(len(t) == 1 for t in starts.values())
    assert test_rate_limit.max_in_window(sorted(t[0] for t in starts.values())) <= 25
    bucket = collect(app)["buckets"]["adm.limited"]
    assert bucket["rate_per_s"] == 20.0 and bucket["burst"] == 5


def test_cluster_status_and_dlq_cli(ns, start_worker):
    """``status`` and ``dlq list`` through the CLI on the cluster; with the cluster down,
    one line and exit code 1."""
    app = ns.app(basic.build)
    worker = start_worker("basic", concurrency=1)
    failed = app.tasks["basic.permanent"].delay(1)
    wait_for(lambda: DeadLetterStore(app).count() == 1, 30, message="a dead letter on the cluster")
    status = status_cli(ns, "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [w["node"] for w in report["workers"]] == [worker.nodename]
    assert report["dead_letters"]["count"] == 1
    listed = test_dlq_cli.ok_json(ns, "list")
    assert [e["id"] for e in listed] == [failed.id]

    dead = "redis+cluster://127.0.0.1:1,127.0.0.1:2/"
    down = status_cli(ns, CR_REDIS_URL=dead)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert f"coordination store at {dead}" in down.stderr
    with pytest.raises(STORE_ERRORS):
        RedisStore(Settings(redis_url=dead)).client.ping()


def test_cluster_script_pipeline_reloads_scripts_a_node_lost(ns, reliable_redis_cluster):
    """The sweep's pipeline after SCRIPT FLUSH on every node (a restart, a failover): each
    node answers NOSCRIPT and each script is run again alone; the replies keep their order."""
    app = ns.app(basic.build)
    store = store_for(app)
    for i in range(3):  # lines with a live holder ('busy'), spread over the nodes
        keys = key_names(store, "g", f"line{i}")
        assert store.run(ORD_START, keys, [1, 60_000, "{}", 60_000])[0] == "run"
    for server in reliable_redis_cluster.servers:
        redis.Redis(port=server.port).script_flush()
    batch = store.pipeline()
    for i in range(6):
        batch.run(ORD_SWEEP, key_names(store, "g", f"line{i}"), [30_000, 10_000])
    batch.command("zcard", index_key(store))
    replies = batch.execute()
    assert replies == [["busy"]] * 3 + [["idle"]] * 3 + [0]
