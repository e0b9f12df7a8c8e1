"""Guarantee 2 (orphans recovered fast): kill -9 a worker mid-task, and a reaper gives its
tasks back within reliable_worker_timeout + reliable_reaper_interval (+ a few seconds),
whatever the broker's visibility timeout, exactly once, and dead-letters poison tasks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_reliable import DeadLetterStore
from celery_reliable.core.store import store_for
from celery_reliable.orphans.registry import RegistryKeys, live_workers, reaper_stats
from celery_reliable.orphans.scripts import LEDGER_START
from celery_reliable.testing import ReaperProcess, WaitTimeout, WorkerProcess, wait_for
from tests.apps import orphans
from tests.apps.common import events, install, make_app
from tests.conftest import ROOT, Namespace

HEARTBEAT = 0.5
TIMEOUT = 3.0
INTERVAL = 0.5
#: Small settings for every worker and reaper of these tests.
FAST = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    "CELERY_RELIABLE_WORKER_TIMEOUT": str(TIMEOUT),
    "CELERY_RELIABLE_REAPER_INTERVAL": str(INTERVAL),
}
#: The guarantee: rerun within worker timeout + reaper interval + this much.
SLACK = 5.0
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: The celery command line for the test app.
CELERY = [sys.executable, "-m", "celery", "-A", "tests.apps.orphans:app"]


@pytest.fixture
def start_reaper(ns: Namespace, tmp_path: Path) -> Iterator[Callable[..., ReaperProcess]]:
    reapers: list[ReaperProcess] = []

    def start(name: str = "reaper", env: dict[str, str] | None = None) -> ReaperProcess:
        reaper = ReaperProcess(
            "tests.apps.orphans:app",
            env=ns.env(**FAST, **(env or {})),
            log_path=tmp_path / f"{name}.log",
            interval=INTERVAL,
            cwd=str(ROOT),
        )
        reapers.append(reaper)
        return reaper

    yield start
    for reaper in reapers:
        reaper.close()


def broker(ns: Namespace) -> redis.Redis:
    return redis.Redis.from_url(ns.broker_url, decode_responses=True)


def started(app: Any) -> list[dict[str, Any]]:
    return events(app, "started")


def start_pair(
    start_worker: Callable[..., WorkerProcess], env: dict[str, str] | None = None, **kw: Any
) -> tuple[WorkerProcess, WorkerProcess]:
    w1 = start_worker("orphans", name="w1", env={**FAST, **(env or {})}, wait=False, **kw)
    w2 = start_worker("orphans", name="w2", env={**FAST, **(env or {})}, wait=False, **kw)
    return w1.wait_ready(), w2.wait_ready()


def kill_the_runner(
    app: Any, workers: tuple[WorkerProcess, WorkerProcess]
) -> tuple[WorkerProcess, WorkerProcess, float]:
    """kill -9 the worker running the first started task; return (victim, survivor, when)."""
    first = wait_for(lambda: started(app), 30, message="the task to start")[0]
    w1, w2 = workers
    victim, survivor = (w1, w2) if first["hostname"] == w1.nodename else (w2, w1)
    killed_at = time.time()
    victim.kill9()
    return victim, survivor, killed_at


def test_orphan_is_rerun_within_worker_timeout(ns, start_worker, start_reaper):
    """Visibility timeout 3600 s (kombu's default): only the reaper can bring it back."""
    app = ns.app(orphans.build)
    reaper = start_reaper()
    workers = start_pair(start_worker)
    reaper.wait_started()
    result = app.tasks["orphans.first_slow"].delay("a", 60)
    _, survivor, killed_at = kill_the_runner(app, workers)

    limit = TIMEOUT + INTERVAL + SLACK
    rerun = wait_for(lambda: started(app)[1:], limit + 5, message="the rerun")[0]
    took = rerun["t"] - killed_at
    print(f"\nrecovery time (kill -9 to rerun start): {took:.2f}s (limit {limit:.1f}s)")
    assert took <= limit
    assert rerun["id"] == result.id and rerun["hostname"] == survivor.nodename
    wait_for(lambda: events(app, "succeeded"), 10, message="the rerun to succeed")
    assert [e["id"] for e in started(app)] == [result.id, result.id]
    assert re.search(rf"recovered orphans\.first_slow\[{result.id}\]", reaper.log())
    assert reaper_stats(app).get("recovered") == 1
    # the dead worker is gone from the registry; the survivor is there, by node name
    assert [w["node"] for w in live_workers(app)] == [survivor.nodename]
    assert broker(ns).hlen(f"{ns.broker_keyprefix}unacked") == 0


def test_recovered_orphan_does_not_come_back_after_visibility_timeout(
    ns, start_worker, start_reaper
):
    """With a short visibility timeout swept every second, the restored message is out of
    kombu's unacked set, so the timeout passing does not run it a third time."""
    visibility = 8.0
    app = ns.app(orphans.build)
    reaper = start_reaper()
    workers = start_pair(start_worker, env={"CR_VISIBILITY_TIMEOUT": str(visibility)})
    reaper.wait_started()
    result = app.tasks["orphans.first_slow"].delay("b", 60)
    _, _, killed_at = kill_the_runner(app, workers)
    wait_for(lambda: events(app, "succeeded"), TIMEOUT + INTERVAL + SLACK + 5, message="rerun")
    # the ack follows the task's last event by a moment (it is sent by the main process)
    wait_for(
        lambda: broker(ns).hlen(f"{ns.broker_keyprefix}unacked") == 0,
        10,
        message="the rerun's ack",
    )
    # The original delivery's visibility timeout expires about now; give the 1 s sweep
    # three more seconds to (wrongly) bring it back.
    remaining = killed_at + visibility + 3 - time.time()
    with pytest.raises(WaitTimeout):
        wait_for(lambda: len(started(app)) > 2, max(remaining, 1), message="a third run")
    assert [e["id"] for e in started(app)] == [result.id, result.id]
    assert len(events(app, "succeeded")) == 1
    assert "recovered orphans.first_slow" in reaper.log()


def test_task_that_kills_its_worker_every_time_is_dead_lettered(ns, start_worker, start_reaper):
    """reliable_max_recoveries=3: it runs three times (killing three workers); orphaned the
    third time, the reaper dead-letters it as 'orphaned', with its arguments, out of the
    unacked set."""
    env = {"CELERY_RELIABLE_MAX_RECOVERIES": "3"}
    app = ns.app(orphans.build)
    reaper = start_reaper(env=env)
    workers = [
        start_worker("orphans", name=f"w{i}", concurrency=1, env={**FAST, **env}, wait=False)
        for i in range(3)
    ]
    for w in workers:
        w.wait_ready()
    reaper.wait_started()
    result = app.tasks["orphans.poison"].apply_async((7,), {"note": "boom"})
    store = DeadLetterStore(app)
    wait_for(lambda: store.count() == 1, 3 * (TIMEOUT + INTERVAL + SLACK), message="dead letter")
    entry = store.get(result.id)
    assert entry.reason == "orphaned"
    assert entry.task == "orphans.poison"
    assert entry.args == [7] and entry.kwargs == {"note": "boom"}
    assert entry.queue == ns.queue
    assert "orphaned 3 times" in (entry.error or "")
    assert [e["id"] for e in started(app)] == [result.id] * 3
    assert not any(w.alive for w in workers)
    assert broker(ns).hlen(f"{ns.broker_keyprefix}unacked") == 0
    assert broker(ns).llen(f"{ns.broker_keyprefix}{ns.queue}") == 0
    stats = reaper_stats(app)
    assert stats.get("recovered") == 2 and stats.get("dead_lettered") == 1
    assert "dead-lettered as 'orphaned'" in reaper.log()


def test_two_reapers_recover_each_orphan_exactly_once(ns, start_worker, start_reaper):
    """Two running tasks and four prefetched ones of a killed worker: each is given back
    once, by one of two reapers; every task then succeeds exactly once."""
    app = ns.app(orphans.build)
    reapers = [start_reaper("reaper-a"), start_reaper("reaper-b")]
    w1 = start_worker("orphans", name="w1", env={**FAST, "CR_SLOW": "1"})
    ids = [app.tasks["orphans.slow_here"].delay(f"t{i}", 60).id for i in range(6)]
    queue_key = f"{ns.broker_keyprefix}{ns.queue}"
    b = broker(ns)
    wait_for(lambda: len(started(app)) == 2 and b.llen(queue_key) == 0, 30, message="2 running")
    # the heartbeat has reported the four prefetched delivery tags
    k = RegistryKeys(store_for(app))
    wait_for(lambda: _held(app, k) == 6, 10, message="6 held tags reported")
    w2 = start_worker("orphans", name="w2", env=FAST)
    for r in reapers:
        r.wait_started()
    first_run = {e["id"] for e in started(app)}
    w1.kill9()
    wait_for(lambda: len(events(app, "succeeded")) == 6, 30, message="6 successes")

    succeeded = Counter(e["id"] for e in events(app, "succeeded"))
    assert sorted(succeeded) == sorted(ids) and set(succeeded.values()) == {1}
    starts = Counter(e["id"] for e in started(app))
    assert all(starts[i] == (2 if i in first_run else 1) for i in ids)
    logs = reapers[0].log() + reapers[1].log()
    recovered = Counter(re.findall(r"recovered orphans\.slow_here\[([0-9a-f-]+)\]", logs))
    assert recovered == Counter({i: 1 for i in first_run})
    assert len(re.findall("gave back prefetched message", logs)) == 4
    assert logs.count("is dead: its store connection closed") == 1  # seen at once
    stats = reaper_stats(app)
    assert stats.get("recovered") == 2 and stats.get("restored_prefetched") == 4
    assert b.hlen(f"{ns.broker_keyprefix}unacked") == 0

    # status shows the survivor by node name; a clean SIGTERM deregisters it
    [row] = live_workers(app)
    assert row["node"] == w2.nodename and row["alive"] and row["in_flight"] == 0
    status = subprocess.run(
        [*CELERY, "reliable", "status", "--json"],
        env={**os.environ, **ns.env(**FAST)},
        cwd=str(ROOT),
        capture_output=True,
        timeout=60,
        check=True,
    )
    report = json.loads(status.stdout)
    assert [w["node"] for w in report["workers"]] == [w2.nodename]
    assert report["orphans"]["recovered"] == 2
    w2.terminate()
    assert w2.wait_exit(30) == 0
    assert live_workers(app) == []


def _held(app: Any, k: RegistryKeys) -> int:
    client: Any = store_for(app).client
    return sum(int(client.hlen(k.held(wid))) for wid in client.zrange(k.workers, 0, -1))


def test_worker_declared_dead_while_paused_notices_and_counts_the_duplicate(
    ns, start_worker, start_reaper
):
    """SIGSTOP a worker past the timeout: its task is recovered and runs on the other
    worker. After SIGCONT the paused worker logs that it was declared dead, registers
    again, and its finishing task reports (and counts) that it ran twice."""
    app = ns.app(orphans.build)
    reaper = start_reaper()
    w1, w2 = start_pair(start_worker)
    reaper.wait_started()
    result = app.tasks["orphans.first_slow"].delay("z", 6)
    first = wait_for(lambda: started(app), 30, message="the task to start")[0]
    victim, survivor = (w1, w2) if first["hostname"] == w1.nodename else (w2, w1)
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        rerun = wait_for(lambda: started(app)[1:], TIMEOUT + INTERVAL + SLACK + 5, message="rerun")
        assert rerun[0]["hostname"] == survivor.nodename
        wait_for(lambda: events(app, "succeeded"), 10, message="the rerun to succeed")
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    victim.wait_log("was declared DEAD by a reaper", 15)
    wait_for(lambda: len(events(app, "succeeded")) == 2, 15, message="the paused run to end")
    victim.wait_log("has probably run twice", 10)
    assert reaper_stats(app).get("duplicates") == 1
    assert [e["id"] for e in events(app, "succeeded")] == [result.id, result.id]
    wait_for(
        lambda: (
            sorted(w["node"] for w in live_workers(app) if w["alive"])
            == sorted([w1.nodename, w2.nodename])
        ),
        10,
        message="the paused worker registered again",
    )


@pytest.mark.amqp
def test_amqp_broker_redelivers_and_reaper_only_cleans_up_and_counts(
    ns, start_worker, start_reaper
):
    """RabbitMQ requeues a dead consumer's unacked message by itself: the reaper publishes
    nothing, but clears the dead worker's ledger and registration and counts a recovery."""
    queue = ns.queue = f"q-reaper-{uuid.uuid4().hex[:10]}"
    env = {"CR_BROKER_URL": AMQP_URL}
    app = install(orphans.build(make_app("producer", AMQP_URL, ns.redis_url, ns.prefix, queue)))
    try:
        reaper = start_reaper(env=env)
        # node names unique on the shared RabbitMQ (their pidbox queues are exclusive)
        w1 = start_worker("orphans", name=f"w1-{queue}", env={**FAST, **env}, wait=False)
        w2 = start_worker("orphans", name=f"w2-{queue}", env={**FAST, **env}, wait=False)
        w1.wait_ready()
        w2.wait_ready()
        reaper.wait_started()
        result = app.tasks["orphans.first_slow"].delay("amqp", 60)
        _, survivor, killed_at = kill_the_runner(app, (w1, w2))
        rerun = wait_for(lambda: started(app)[1:], 15, message="the broker's redelivery")[0]
        print(f"\nAMQP redelivery time (kill -9 to rerun start): {rerun['t'] - killed_at:.2f}s")
        assert rerun["hostname"] == survivor.nodename
        wait_for(lambda: reaper_stats(app).get("recovered") == 1, 15, message="reaper counted")
        assert "redelivered by the broker, not published again" in reaper.log()
        k = RegistryKeys(store_for(app))
        client: Any = store_for(app).client
        assert [w["node"] for w in live_workers(app)] == [survivor.nodename]
        assert client.keys(k.store.key("{reaper}", "*ledger*")) == []
        assert int(client.get(k.recoveries(result.id))) == 1
        # no second copy: nothing waits on the queue and no third run happens
        with pytest.raises(WaitTimeout):
            wait_for(lambda: len(started(app)) > 2, 2, message="a third run")
        with app.connection_for_write() as conn:
            _, waiting, _ = conn.default_channel.queue_declare(queue, passive=True)
        assert waiting == 0
        assert [e["id"] for e in events(app, "succeeded")] == [result.id]
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)


@pytest.mark.amqp
def test_amqp_task_that_kills_its_worker_every_time_is_dead_lettered_at_start(
    ns, start_worker, start_reaper
):
    """On RabbitMQ the broker redelivers a poison task by itself, as fast as workers die.
    The reaper counts one recovery per dead worker; past reliable_max_recoveries the next
    worker to receive it dead-letters it ('orphaned') instead of running it."""
    queue = ns.queue = f"q-reaper-{uuid.uuid4().hex[:10]}"
    env = {"CR_BROKER_URL": AMQP_URL, "CELERY_RELIABLE_MAX_RECOVERIES": "2"}
    app = install(orphans.build(make_app("producer", AMQP_URL, ns.redis_url, ns.prefix, queue)))
    try:
        reaper = start_reaper(env=env)
        workers = [
            start_worker(
                "orphans", name=f"w{i}-{queue}", concurrency=1, env={**FAST, **env}, wait=False
            )
            for i in range(3)
        ]
        for w in workers:
            w.wait_ready()
        reaper.wait_started()
        result = app.tasks["orphans.poison"].apply_async((9,), {"note": "amqp"})
        wait_for(lambda: not any(w.alive for w in workers), 30, message="3 dead workers")
        assert [e["id"] for e in started(app)] == [result.id] * 3
        wait_for(lambda: reaper_stats(app).get("recovered") == 3, 15, message="3 recoveries")
        last = start_worker("orphans", name=f"w3-{queue}", concurrency=1, env={**FAST, **env})
        store = DeadLetterStore(app)
        wait_for(lambda: store.count() == 1, 15, message="the dead letter")
        entry = store.get(result.id)
        assert entry.reason == "orphaned" and entry.args == [9] and entry.kwargs == {"note": "amqp"}
        assert "orphaned 3 times" in (entry.error or "")
        assert len(started(app)) == 3  # the fourth delivery did not run the body
        assert last.alive
        with app.connection_for_write() as conn:
            _, waiting, _ = conn.default_channel.queue_declare(queue, passive=True)
        assert waiting == 0
    finally:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)


def test_embedded_reaper_recovers_without_a_reaper_process(ns, start_worker):
    """reliable_embedded_reaper: the workers elect a leader that runs the reaper pass."""
    app = ns.app(orphans.build)
    workers = start_pair(start_worker, env={"CELERY_RELIABLE_EMBEDDED_REAPER": "1"})
    result = app.tasks["orphans.first_slow"].delay("e", 60)
    _, survivor, killed_at = kill_the_runner(app, workers)
    # if the victim led, the survivor takes the lease (worker_timeout long) over in time
    limit = TIMEOUT + INTERVAL + SLACK
    rerun = wait_for(lambda: started(app)[1:], limit + 5, message="the rerun")[0]
    print(f"\nembedded reaper recovery time: {rerun['t'] - killed_at:.2f}s")
    assert rerun["t"] - killed_at <= limit
    assert rerun["id"] == result.id and rerun["hostname"] == survivor.nodename
    survivor.wait_log("now runs the embedded reaper", 10)
    assert f"recovered orphans.first_slow[{result.id}]" in survivor.log()
    assert reaper_stats(app).get("recovered") == 1


def _fabricate_dead_workers(
    app: Any, ns: Namespace, workers: int, per_worker: int
) -> tuple[list[str], list[str]]:
    """Publish tasks, take them into kombu's unacked set as a consumer would, and file them
    in the ledgers of registered workers whose heartbeat is long past. Returns the worker
    ids and the delivery tags."""
    store = store_for(app)
    k = RegistryKeys(store)
    task = app.tasks["orphans.first_slow"]
    for i in range(workers * per_worker):
        task.delay(f"f{i}", 0)
    conn = app.connection_for_write()
    channel = conn.channel()
    messages = []
    for _ in range(workers * per_worker):
        message = channel.basic_get(ns.queue)
        assert message is not None
        messages.append(message)
    channel.qos._delivered.clear()  # this consumer "dies": close without restoring
    conn.release()
    wids, tags = [], []
    client: Any = store.client
    for w in range(workers):
        wid = f"fake-host:{w}:{uuid.uuid4().hex[:8]}"
        wids.append(wid)
        for message in messages[w * per_worker : (w + 1) * per_worker]:
            entry = {
                "tag": message.delivery_tag,
                "task": message.headers["task"],
                "exchange": ns.queue,
                "routing_key": ns.queue,
                "t": time.time(),
            }
            store.run(
                LEDGER_START,
                keys=[k.ledger(wid), k.workers, k.recoveries(message.headers["id"])],
                args=[wid, message.headers["id"], json.dumps(entry)],
            )
            tags.append(message.delivery_tag)
        client.zadd(k.workers, {wid: time.time() - 3600})
    return wids, tags


def test_concurrent_reaper_passes_recover_each_message_once(ns):
    """Eight reapers racing on four dead workers (twenty unacked messages): each worker is
    claimed once and each message restored once, straight out of kombu's unacked set."""
    import threading

    from celery_reliable.orphans.reaper import Reaper

    app = ns.app(orphans.build, reliable_heartbeat_interval=0.5, reliable_worker_timeout=1)
    wids, tags = _fabricate_dead_workers(app, ns, workers=4, per_worker=5)
    b = broker(ns)
    assert b.hlen(f"{ns.broker_keyprefix}unacked") == 20
    assert b.llen(f"{ns.broker_keyprefix}{ns.queue}") == 0

    results: list[Any] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        reaper = Reaper(app)
        barrier.wait()
        results.append(reaper.run_pass())
        reaper.close()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    claimed = Counter(w for r in results for w in r.dead_workers)
    assert claimed == Counter({w: 1 for w in wids})
    restored = Counter(rec.tag for r in results for rec in r.recoveries if rec.action == "restored")
    assert restored == Counter({t: 1 for t in tags})
    assert b.hlen(f"{ns.broker_keyprefix}unacked") == 0
    assert b.llen(f"{ns.broker_keyprefix}{ns.queue}") == 20
    assert reaper_stats(app) == {"dead_workers": 4, "recovered": 20}
    # a second round finds nothing to do
    assert Reaper(app).run_pass().recoveries == []


def test_unacked_entries_kombu_cannot_read_are_dead_lettered_not_a_stuck_reaper(ns):
    """Before: one entry of kombu's unacked hash that is no readable message (written by
    hand, or a hostile envelope left by a worker killed before it dead-lettered it) made
    every reaper pass fail at it, so the messages behind it were never swept. Now each is
    dead-lettered as malformed and removed, and the pass goes on."""
    from celery_reliable.orphans.reaper import Reaper

    app = ns.app(orphans.build, reliable_heartbeat_interval=0.5, reliable_worker_timeout=1)
    _, tags = _fabricate_dead_workers(app, ns, workers=1, per_worker=2)
    b = broker(ns)
    unacked, index = f"{ns.broker_keyprefix}unacked", f"{ns.broker_keyprefix}unacked_index"
    # the dead worker's ledger entries now point at entries kombu cannot read, or could
    # read but not restore (its restore drops a message whose headers are no mapping)
    ledgered = [
        json.dumps([{"body": "x", "properties": None}, "", ns.queue]),
        json.dumps([{**json.loads(b.hget(unacked, tags[1]))[0], "headers": None}, "", ns.queue]),
    ]
    for tag, raw in zip(tags, ledgered, strict=True):
        b.hset(unacked, tag, raw)
    # a good message delivered to a worker that died before it reported it (swept)
    app.tasks["orphans.first_slow"].delay("swept", 0)
    conn = app.connection_for_write()
    channel = conn.channel()
    good = channel.basic_get(ns.queue)
    channel.qos._delivered.clear()
    conn.release()
    # unreadable entries older than it, so that the sweep meets them first
    unreadable = {"bad-1": "not json", "bad-2": "[1]", "bad-3": json.dumps([5, "", "q"])}
    for i, (tag, raw) in enumerate(unreadable.items()):
        b.hset(unacked, tag, raw)
        b.zadd(index, {tag: i + 1})

    reaper = Reaper(app)
    done: list[Any] = []

    def swept() -> bool:
        done.extend(reaper.run_pass().recoveries)  # raises if a pass fails
        return any(r.tag == good.delivery_tag for r in done)

    try:
        wait_for(swept, 20, interval=0.2, message=lambda: f"the good message swept: {done}")
    finally:
        reaper.close()
    actions = {r.tag: r.action for r in done}
    assert actions[good.delivery_tag] == "restored_unclaimed"
    assert {t: actions[t] for t in (*unreadable, *tags)} == dict.fromkeys(
        (*unreadable, *tags), "dead_lettered"
    )
    dead = DeadLetterStore(app).list(limit=None)
    assert sorted(e.body or "" for e in dead) == sorted([*unreadable.values(), *ledgered])
    assert {e.reason for e in dead} == {"malformed"}
    assert b.hlen(unacked) == 0 and b.zcard(index) == 0
    assert b.llen(f"{ns.broker_keyprefix}{ns.queue}") == 1  # the good one, back on its queue


def test_reaper_once_prints_what_it_did(ns, tmp_path):
    """`celery -A APP reliable-reaper --once` runs one pass and prints it as JSON."""
    app = ns.app(orphans.build)
    [wid], tags = _fabricate_dead_workers(app, ns, workers=1, per_worker=2)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.apps.orphans:app",
            "reliable-reaper",
            "--once",
        ],
        env={**os.environ, **ns.env(**FAST), "PYTHONUNBUFFERED": "1"},
        cwd=str(ROOT),
        capture_output=True,
        timeout=60,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["dead_workers"] == [wid]
    assert sorted(r["tag"] for r in report["recoveries"]) == sorted(tags)
    assert {r["action"] for r in report["recoveries"]} == {"restored"}
    assert "recovered orphans.first_slow" in out.stderr.decode()


def test_paused_worker_does_not_ack_away_the_recovered_copy(ns, start_worker, start_reaper):
    """The recovered message keeps its delivery tag. The paused worker, resumed, must not
    acknowledge it: that would delete the copy now running elsewhere from kombu's unacked
    set, and if that second worker is killed too, nothing could bring the task back."""
    app = ns.app(orphans.build)
    reaper = start_reaper()
    w1, w2 = start_pair(start_worker)
    reaper.wait_started()
    result = app.tasks["orphans.slow_twice"].delay("g", 5, 60)
    first = wait_for(lambda: started(app), 30, message="the task to start")[0]
    paused, other = (w1, w2) if first["hostname"] == w1.nodename else (w2, w1)
    os.killpg(paused.pid, signal.SIGSTOP)
    try:
        second = wait_for(lambda: started(app)[1:], TIMEOUT + INTERVAL + SLACK + 5, message="2nd")
        assert second[0]["hostname"] == other.nodename
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    # the paused run ends (its sleep is long over); its ack is withheld
    paused.wait_log("not sending the acknowledge of message", 15)
    assert [e["hostname"] for e in events(app, "succeeded")] == [paused.nodename]
    other.kill9()
    third = wait_for(lambda: started(app)[2:], TIMEOUT + INTERVAL + SLACK + 5, message="3rd run")
    assert third[0]["hostname"] == paused.nodename and third[0]["attempt"] == 3
    wait_for(lambda: len(events(app, "succeeded")) == 2, 10, message="the third run to end")
    assert [e["id"] for e in started(app)] == [result.id] * 3
    assert re.search(rf"recovered orphans\.slow_twice\[{result.id}\].*recovery 2 of", reaper.log())
    assert broker(ns).hlen(f"{ns.broker_keyprefix}unacked") == 0


@pytest.mark.parametrize("fetch", ["1", "0"], ids=["reliable-fetch", "ledger"])
def test_worker_and_reaper_survive_a_coordination_redis_outage(
    ns, start_worker, start_reaper, fetch
):
    """The coordination Redis dies and comes back empty: tasks keep running, heartbeat and
    reaper log the outage and resume, nobody is reaped. With reliable fetch the tasks are
    recorded in the worker's fetch record on the broker; without it the ledger cannot
    record them, and says so for each."""
    from celery_reliable.testing import RedisServer

    coord = RedisServer().start()
    try:
        ns.redis_url = coord.url(1)
        app = ns.app(orphans.build)
        reaper = start_reaper()
        worker = start_worker("orphans", name="w1", env={**FAST, "CELERY_RELIABLE_FETCH": fetch})
        reaper.wait_started()
        touched = f"{ns.prefix}:test:touched"
        b = broker(ns)
        coord.kill()
        for i in range(3):
            app.tasks["orphans.touch"].delay(f"during-{i}")
        wait_for(lambda: b.llen(touched) == 3, 30, message="3 tasks run during the outage")
        worker.wait_log("failed (", 10)
        if fetch == "0":
            worker.wait_log("could not record orphans.touch", 10)
        else:
            assert "could not record" not in worker.log()  # no ledger write to fail
        wait_for(lambda: "reaper: pass failed" in reaper.log(), 10, message="reaper logs it")
        coord.start()
        worker.wait_log("is back", 15)
        wait_for(lambda: "passes succeed again" in reaper.log(), 15, message="reaper resumes")
        app.tasks["orphans.touch"].delay("after")
        wait_for(lambda: b.llen(touched) == 4, 15, message="a task after the outage")
        [row] = live_workers(app)
        assert row["node"] == worker.nodename and row["alive"]
        assert worker.alive and "declared DEAD" not in worker.log()
        assert "dead_workers" not in reaper_stats(app)
    finally:
        coord.close()


def test_worker_ids_are_unique_even_for_the_same_host_and_pid():
    from celery_reliable.orphans.registry import new_worker_id

    ids = {new_worker_id("web-1", 42) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("web-1:42:") and "{" not in i for i in ids)
    assert new_worker_id("we{ird}", 1).startswith("weird:1:")  # no hash-tag braces in keys


@pytest.mark.parametrize(
    ("url", "redis_broker"),
    [
        ("redis://localhost:6379/0", True),
        ("rediss://:pw@cache:6380/1", True),
        ("sentinel://s1:26379;sentinel://s2:26379", True),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
        ("pyamqp://localhost//", False),
    ],
)
def test_broker_kind_decides_how_orphans_are_recovered(url, redis_broker):
    from celery import Celery

    from celery_reliable.core.broker import broker_is_redis

    assert broker_is_redis(Celery("x", broker=url)) is redis_broker
