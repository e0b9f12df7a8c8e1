"""Reliable fetch on the Redis broker, and process death seen at once.

- The kill loop: prefork workers are kill -9'ed at 25 random instants (seeded: set
  CR_KILL_SEED to replay one) while they drain plain and Reliable tasks, with the reaper on
  and the broker's visibility timeout at its default hour: every published id runs.
- A kill -9'ed worker's store connection closes at once: the reaper recovers its task
  within reliable_reaper_interval + 1 s with the default settings (worker timeout 10 s).
- A SIGSTOPped worker keeps its connection: it is not judged dead before the timeout.
- In-process, against a real Redis: the fetch script delivers in kombu's own order
  (priority steps, fair rotation, global_keyprefix) and records each message atomically.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_reliable.core.compat import kombu_redis
from celery_reliable.core.config import DEFAULT_REAPER_INTERVAL, DEFAULT_WORKER_TIMEOUT
from celery_reliable.core.store import store_for
from celery_reliable.orphans.fetch import ReliableFetch
from celery_reliable.orphans.reaper import last_pass
from celery_reliable.orphans.registry import RegistryKeys, live_workers, reaper_stats, record_key
from celery_reliable.testing import ReaperProcess, RedisServer, WorkerProcess, wait_for
from tests.apps import fetch as fetch_app
from tests.apps.common import events
from tests.conftest import ROOT, Namespace

#: Seed of the kill instants (printed; CR_KILL_SEED=N replays a run).
SEED = int(os.environ.get("CR_KILL_SEED", "20261201"))
KILLS = 25
#: The feeder keeps about this many messages queued while the workers are killed.
BACKLOG = 200
#: Seconds without a single task finishing after which the final drain has stalled.
STALL = 30.0
#: Stalled survivors killed and replaced at most this many times before the test fails.
MAX_STALLS = 1
BATCH = 50
#: Fast liveness for the kill loop, so the reaper gives messages back within a second.
FAST = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "0.5",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "3",
    "CELERY_RELIABLE_REAPER_INTERVAL": "0.5",
}


@pytest.fixture
def start_reaper(ns: Namespace, tmp_path: Path) -> Iterator[Callable[..., ReaperProcess]]:
    reapers: list[ReaperProcess] = []

    def start(env: dict[str, str] | None = None) -> ReaperProcess:
        reaper = ReaperProcess(
            "tests.apps.fetch:app",
            env=ns.env(**(env or {})),
            log_path=tmp_path / f"reaper{len(reapers)}.log",
            cwd=str(ROOT),
        )
        reapers.append(reaper)
        return reaper.wait_started()

    yield start
    for reaper in reapers:
        reaper.close()


def registry_age(app: Any) -> float:
    """Seconds since the store's worker registry began (its generation marker)."""
    store = store_for(app)
    began = store.client.get(RegistryKeys(store).epoch)
    seconds, micros = store.client.time()
    return seconds + micros / 1e6 - float(began) if began else 0.0


def reaper_passes_since(app: Any, since: float) -> Callable[[], int]:
    """A counter of the reaper passes recorded after ``since`` (each poll sees the last
    pass; poll faster than the reaper interval to see them all)."""
    seen: set[float] = set()

    def count() -> int:
        at = last_pass(app).get("at")
        if at is not None and at > since:
            seen.add(at)
        return len(seen)

    return count


def broker(ns: Namespace) -> redis.Redis:
    return redis.Redis.from_url(ns.broker_url, decode_responses=True)


def fetch_records(ns: Namespace) -> dict[str, int]:
    """Every fetch record of the test's namespace: key -> entries."""
    client = broker(ns)
    pattern = f"{ns.broker_keyprefix}{ns.prefix}:fetch:*"
    return {key: client.hlen(key) for key in client.scan_iter(pattern)}


@pytest.mark.timeout(300)
def test_kill_loop_loses_nothing(
    ns: Namespace, start_worker: Callable[..., WorkerProcess], start_reaper: Any
) -> None:
    """Two workers take turns being kill -9'ed while a feeder keeps their queue full."""
    app = ns.app(fetch_app.build)
    runs = fetch_app.runs_key(app)
    reaper = start_reaper(FAST)
    client = broker(ns)
    store = redis.Redis.from_url(ns.redis_url, decode_responses=True)
    queue = f"{ns.broker_keyprefix}{ns.queue}"
    ids: list[str] = []
    stop = threading.Event()

    def feed() -> None:  # half plain Celery tasks, half ReliableTasks, ~BACKLOG queued
        while not stop.is_set():
            if client.llen(queue) >= BACKLOG:
                stop.wait(0.02)
                continue
            for _ in range(BATCH):
                task = app.tasks["fetch.plain" if len(ids) % 2 else "fetch.reliable"]
                ids.append(task.delay(len(ids)).id)

    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    rng = random.Random(SEED)
    slots = [start_worker("fetch", name=f"k{i}", env=FAST, wait=False) for i in range(2)]
    progress = []
    try:
        for k in range(KILLS):
            victim = slots[k % 2].wait_ready()
            time.sleep(rng.uniform(0.05, 1.0))  # the random instant of the kill is the test
            victim.kill9()
            progress.append(store.hlen(runs))
            slots[k % 2] = start_worker("fetch", name=f"k{k + 2}", env=FAST, wait=False)
    finally:
        stop.set()
        feeder.join(10)
    published = len(ids)

    def missing() -> list[str]:
        ran = store.hgetall(runs)
        return [i for i in ids if i not in ran]

    def diagnose() -> str:
        left = missing()
        unacked = client.hlen(f"{ns.broker_keyprefix}unacked")
        logs = []
        for worker in slots:  # the live workers: what did they do with the missing ids?
            text = worker.log()
            seen = [line for line in text.splitlines() if any(i in line for i in left[:5])]
            logs.append(f"--- {worker.name} ({worker.pid}): {seen}\n{text[-1500:]}")
        return (
            f"{len(left)} of {published} never ran (seed {SEED}): {left[:5]}; unacked "
            f"{unacked}, queued {client.llen(queue)}, records {fetch_records(ns)}; ran after "
            f"each kill: {progress}\n{reaper.log()[-2000:]}\n" + "\n".join(logs)
        )

    # Under load the survivors drain slowly: wait while they make progress. A survivor can
    # stall with a message it holds (seen: a pool process silent from its first task on,
    # cause unknown); that message is not lost (it is in unacked and the worker's fetch
    # record), so the stalled survivors are killed too, like any other, and replaced.
    last = (-1, time.monotonic())
    stalls = 0
    while missing():
        done = store.hlen(runs)
        if done != last[0]:
            last = (done, time.monotonic())
        elif time.monotonic() - last[1] > STALL:
            if stalls == MAX_STALLS or client.llen(queue) or not fetch_records(ns):
                raise AssertionError(f"no progress for {STALL:.0f}s: {diagnose()}")
            stalls += 1
            print(f"\nstalled with {missing()} held: {diagnose()}")
            for i, worker in enumerate(slots):
                worker.kill9()
                slots[i] = start_worker("fetch", name=f"s{stalls}{i}", env=FAST, wait=False)
            last = (done, time.monotonic())
        time.sleep(0.2)
    wait_for(
        lambda: client.hlen(f"{ns.broker_keyprefix}unacked") == 0 and not fetch_records(ns),
        30,
        message=lambda: f"unacked and fetch records to empty: {diagnose()}",
    )
    assert client.llen(queue) == 0
    again = sum(int(n) - 1 for n in store.hgetall(runs).values())
    print(
        f"\nkill loop (seed {SEED}): {KILLS} kill -9, {published} tasks, 0 lost, {again} "
        f"re-runs of interrupted tasks, {stalls} stalled survivor pair(s) killed; ran after "
        f"each kill: {progress}"
    )


def test_killed_worker_is_recovered_within_reaper_interval_plus_one_second(
    ns: Namespace, start_worker: Callable[..., WorkerProcess], start_reaper: Any
) -> None:
    """Default settings (worker timeout 10 s): only the closed connection explains it."""
    app = ns.app(fetch_app.build)
    reaper = start_reaper()
    w1 = start_worker("fetch", name="w1", wait=False)
    w2 = start_worker("fetch", name="w2", wait=False)
    w1.wait_ready(), w2.wait_ready()
    wait_for(lambda: len(live_workers(app)) == 2, 10, message="both workers registered")
    # A new registry is not judged for a worker timeout (it may lack live workers): wait
    # until this one is older, as any registry in production is.
    wait_for(lambda: registry_age(app) > DEFAULT_WORKER_TIMEOUT, 30, message="registry age")
    result = app.tasks["fetch.hold"].delay(30)
    first = wait_for(lambda: events(app, "started"), 30, message="the task to start")[0]
    victim, survivor = (w1, w2) if first["hostname"] == w1.nodename else (w2, w1)
    killed_at = time.time()
    victim.kill9()
    interval = DEFAULT_REAPER_INTERVAL
    rerun = wait_for(lambda: events(app, "started")[1:], 30, message="the rerun")[0]
    took = rerun["t"] - killed_at
    print(f"\nkill -9 to rerun start: {took:.2f}s (reaper interval {interval}s, timeout 10s)")
    assert rerun["id"] == result.id and rerun["hostname"] == survivor.nodename
    assert "its store connection closed" in reaper.log()
    assert took <= interval + 1.0


def test_paused_worker_whose_connection_lives_is_not_judged_dead(
    ns: Namespace, start_worker: Callable[..., WorkerProcess], start_reaper: Any
) -> None:
    """SIGSTOP for six reaper passes (below the worker timeout): nobody is reaped."""
    env = {**FAST, "CELERY_RELIABLE_WORKER_TIMEOUT": "6"}
    app = ns.app(fetch_app.build)
    reaper = start_reaper(env)
    w1 = start_worker("fetch", name="w1", env=env, wait=False)
    w2 = start_worker("fetch", name="w2", env=env, wait=False)
    w1.wait_ready(), w2.wait_ready()
    app.tasks["fetch.hold"].delay(1.0)
    first = wait_for(lambda: events(app, "started"), 30, message="the task to start")[0]
    paused = w1 if first["hostname"] == w1.nodename else w2
    paused.signal(signal.SIGSTOP)
    try:
        passes = reaper_passes_since(app, time.time())
        # six reaper passes judge the paused worker (its last heartbeat ages past half the
        # timeout); the deadline stays inside the timeout, after which it would be dead
        wait_for(lambda: passes() >= 6, 5, interval=0.05, message="six reaper passes")
        assert paused.nodename in [w["node"] for w in live_workers(app)]
    finally:
        paused.signal(signal.SIGCONT)
    wait_for(lambda: events(app, "succeeded"), 30, message="the paused task to finish")
    assert "is dead" not in reaper.log()
    assert len(events(app, "started")) == 1, "the task ran again: its worker was reaped"
    assert not reaper_stats(app).get("dead_workers")


def test_kombu_touchpoints_exist(reliable_redis_server: RedisServer) -> None:
    """Every private kombu attribute reliable fetch uses is there in the installed kombu
    (on live objects: some are set in ``__init__``)."""
    with Connection(reliable_redis_server.url(5)) as conn:
        channel = conn.channel()
        live = {"Channel": channel, "QoS": channel.qos, "Transport": conn.transport}
        missing = [
            f"{owner.__module__}.{owner.__name__}.{attr}"
            for owner, attr, _ in kombu_redis.TOUCHPOINTS
            if not hasattr(live.get(owner.__name__, owner), attr)
        ]
    assert not missing


PUBLISHED = [("a", 0), ("a", 0), ("b", 0), ("a", 9), ("b", 5), ("b", 0), ("a", 3), ("b", 9)]


def consume_in_order(url: str, keyprefix: str, fetch: bool) -> list[str]:
    """Publish PUBLISHED to queues a and b, then consume both with one consumer (kombu's
    own, or with reliable fetch) and return the bodies in the order received. With fetch,
    check at each delivery that the message is in unacked, its index and the record, and
    gone from all three once acknowledged."""
    client = redis.Redis.from_url(url, decode_responses=True)
    record = record_key("t", "host:1:cafe")
    unacked, index = f"{keyprefix}unacked", f"{keyprefix}unacked_index"
    exchange = Exchange("fetchtest", type="direct")
    queues = [Queue(q, exchange, routing_key=q) for q in ("a", "b")]
    got: list[str] = []
    with Connection(url, transport_options={"global_keyprefix": keyprefix}) as conn:
        producer = Producer(conn.channel(), exchange)
        for i, (queue, priority) in enumerate(PUBLISHED):
            declare = list(queues)  # publish appends the exchange to it
            producer.publish(f"{queue}{i}", routing_key=queue, priority=priority, declare=declare)
        channel = conn.channel()
        if fetch:
            ReliableFetch(channel, record).install()

        def on_message(body: str, message: Any) -> None:
            tag = message.delivery_tag
            if fetch:
                assert client.hexists(unacked, tag) and client.zscore(index, tag) is not None
                entry = client.hget(f"{keyprefix}{record}", tag)
                assert entry is not None and '"q"' in entry
            message.ack()
            assert not client.hexists(unacked, tag)
            assert not client.hexists(f"{keyprefix}{record}", tag)
            got.append(body)

        with Consumer(channel, queues, callbacks=[on_message], prefetch_count=1):
            deadline = time.monotonic() + 20
            while len(got) < len(PUBLISHED) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)
    return got


def test_fetch_keeps_kombus_order_priorities_rotation_and_key_prefix(
    reliable_redis_server: RedisServer,
) -> None:
    """The same messages come out in the same order as with kombu's BRPOP."""
    url = reliable_redis_server.url(5)
    tag = os.urandom(4).hex()
    stock = consume_in_order(url, f"s{tag}:", fetch=False)
    fetched = consume_in_order(url, f"f{tag}:", fetch=True)
    assert len(stock) == len(PUBLISHED)
    assert fetched == stock


def test_a_lost_fetch_reply_is_given_back_by_its_live_worker(
    reliable_redis_server: RedisServer,
) -> None:
    """The fetch script ran but its reply never reached the worker (a connection drop):
    the message is in unacked and the record, not delivered. The worker's periodic check
    puts it back on its queue; a message it did deliver stays."""
    url = reliable_redis_server.url(5)
    keyprefix = f"l{os.urandom(4).hex()}:"
    client = redis.Redis.from_url(url, decode_responses=True)
    record = record_key("t", "host:2:beef")
    exchange = Exchange("losttest", type="direct")
    queue = Queue("lost", exchange, routing_key="lost")
    with Connection(url, transport_options={"global_keyprefix": keyprefix}) as conn:
        producer = Producer(conn.channel(), exchange)
        for body in ("lost", "kept"):
            producer.publish(body, routing_key="lost", declare=[queue])
        channel = conn.channel()
        fetch = ReliableFetch(channel, record)
        fetch.install()
        # a pop whose reply is lost: run the script directly, nobody reads the reply
        unacked, index = kombu_redis.unacked_keys(channel)
        keys = [keyprefix + k for k in (unacked, index, record)]
        qkeys = [keyprefix + k for k, _ in kombu_redis.queue_keys(channel, ["lost"])]
        names = [n for _, n in kombu_redis.queue_keys(channel, ["lost"])]
        client.evalsha(fetch.sha, 3 + len(qkeys), *keys, *qkeys, *names)
        assert client.hlen(f"{keyprefix}{record}") == 1
        assert client.llen(f"{keyprefix}lost") == 1
        got: list[str] = []
        with Consumer(channel, [queue], callbacks=[lambda b, m: got.append(b)]):
            conn.drain_events(timeout=5)  # "kept" is delivered (and not acknowledged)
            assert got == ["kept"]
            assert fetch.reconcile(0.0, set()) == 1
        assert client.llen(f"{keyprefix}lost") == 1  # "lost" is back on its queue
        assert client.hlen(f"{keyprefix}{record}") == 1  # only "kept" is still recorded
        assert client.hlen(f"{keyprefix}unacked") == 1
