"""Store faults neither loop nor crash: a failing dead-letter write backs off for the
documented cycle, an exception that cannot be unpickled never reaches the main process, a
store that came back empty makes the reaper wait before judging anyone, and a worker whose
store is unusable stops (wrong password, not Redis) or does not consume until it has
registered (unreachable). Every test runs real prefork workers on real Redis servers; the
coordination store is a second server, so the broker's queue survives its faults."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_reliable import DeadLetterStore
from celery_reliable.deadletters.store import WRITE_ERROR_LOG_INTERVAL, WRITE_PATIENCE
from celery_reliable.orphans.reaper import Reaper
from celery_reliable.testing import RedisServer, free_port, wait_for
from tests.apps import faults
from tests.conftest import Namespace
from tests.test_badinput import leftovers, raw_entries

#: Worker liveness settings of the reaper test: a heartbeat slow enough that the reaper's
#: pass right after the restart comes before the worker's next beat.
SLOW_BEAT = {
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "1.5",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "4",
}


@pytest.fixture
def store() -> Iterator[RedisServer]:
    """A coordination Redis of the test's own (the broker stays on the session server)."""
    server = RedisServer().start()
    yield server
    server.close()


def on_store(ns: Namespace, server: RedisServer, **conf: Any) -> tuple[Namespace, Any]:
    moved = dataclasses.replace(ns, redis_url=server.url(0))
    return moved, moved.app(faults.build, **conf)


def test_failing_dead_letter_write_backs_off_instead_of_looping(ns, store, start_worker):
    """The store at maxmemory with noeviction refuses every write (OOM, not a connection
    error): the failing task comes back about every WRITE_PATIENCE seconds, not hundreds of
    times, each cycle logged once, and is dead-lettered once the store has room again."""
    ns, app = on_store(ns, store)
    worker = start_worker("faults", concurrency=1, env={"CR_REDIS_URL": store.url(0)})
    admin = redis.Redis.from_url(store.url(0))
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # below what is used: every write is refused
    doomed = app.tasks["faults.doomed"].delay(1)
    seen: dict[int, float] = {}

    def runs_seen(n: int) -> bool:
        count = len(faults.runs(app, doomed.id))
        for i in range(1, count + 1):
            seen.setdefault(i, time.monotonic())
        return count >= n

    wait_for(lambda: runs_seen(3), 30, interval=0.01, message=lambda: worker.log()[-3000:])
    cycles = [seen[i + 1] - seen[i] for i in (1, 2)]
    assert min(cycles) >= WRITE_PATIENCE * 0.9, f"came back after {cycles} s"
    log = worker.log()
    assert "OutOfMemoryError" in log and "requeueing the message" in log
    assert log.count("Dead-letter store unreachable or failing") <= len(seen), log[-3000:]
    admin.config_set("maxmemory", 0)
    dlq = DeadLetterStore(app)
    wait_for(lambda: dlq.count() == 1, 30, message=lambda: worker.log()[-3000:])
    assert dlq.get(doomed.id).reason == "dead_letter_for"
    assert worker.alive


def test_unreadable_queue_entries_wait_for_a_failing_store_and_are_never_lost(
    ns, store, start_worker
):
    """While the store refuses writes, an entry kombu cannot read is not lost and not
    looped hot: one that was never recorded goes back on its queue, a recorded one stays
    in the fetch record until the worker's record check gives it back; both are
    dead-lettered once the store has room again, and leave nothing behind."""
    ns, app = on_store(ns, store)
    worker = start_worker(
        "faults",
        concurrency=1,
        env={
            "CR_REDIS_URL": store.url(0),
            "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "0.5",
            "CELERY_RELIABLE_WORKER_TIMEOUT": "2",
        },
    )
    admin = redis.Redis.from_url(store.url(0))
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    broker = redis.Redis.from_url(ns.broker_url)
    queue_key = ns.broker_keyprefix + ns.queue
    plain, recorded = raw_entries(ns)[0], raw_entries(ns)[-1]
    tag = json.loads(recorded)["properties"]["delivery_tag"]
    broker.lpush(queue_key, plain, recorded)
    log = "could not dead-letter an undeliverable entry"
    started = time.monotonic()
    wait_for(lambda: worker.log().count(log) >= 1, 30, message=lambda: worker.log()[-3000:])
    # a full cycle of the recorded entry: a failed write, kept in the fetch record, given
    # back to its queue by the worker's record check (the unrecorded one cycles meanwhile)
    wait_for(
        lambda: f"gave back message {tag}" in worker.log(),
        30,
        message=lambda: worker.log()[-3000:],
    )
    assert worker.alive and "Unrecoverable error" not in worker.log()

    def kept(item: bytes) -> bool:  # between its pops, an entry is back on its queue
        return item in broker.lrange(queue_key, 0, -1)

    wait_for(lambda: kept(plain), 10, message="the unrecorded entry pushed back")
    wait_for(lambda: kept(recorded) or tag in leftovers(broker, ns, {tag}), 10)
    most = 1 + (time.monotonic() - started) / WRITE_ERROR_LOG_INTERVAL  # once per interval
    assert worker.log().count(log) <= most, worker.log()[-3000:]

    admin.config_set("maxmemory", 0)
    dlq = DeadLetterStore(app)
    wait_for(lambda: dlq.count() == 2, 30, message=lambda: worker.log()[-3000:])
    bodies = sorted((e.body or "" for e in dlq.list(limit=None)), key=len)
    # the recorded one came back through kombu's restore, which marks it redelivered
    assert bodies[0] == plain.decode() and tag in bodies[1]
    assert broker.llen(queue_key) == 0 and leftovers(broker, ns, {tag}) == set()
    assert worker.alive


def test_exception_that_cannot_be_unpickled_never_stops_the_worker(ns, start_worker):
    """A store error whose exception object would not unpickle in the main process: the
    ordering start that hits it requeues with a text reason, and so does a task body that
    rejects with one. The worker keeps serving; the ordered task runs once."""
    app = ns.app(faults.build)
    worker = start_worker("faults", concurrency=1, env={"CR_INJECT_UNPICKLABLE": "1"})
    ordered = app.tasks["faults.ordered"].delay("k1")
    rejected = app.tasks["faults.reject_unpicklable"].delay()
    ok = app.tasks["faults.ok"].delay(1)
    wait_for(
        lambda: faults.runs(app, ok.id) and faults.runs(app, ordered.id),
        30,
        message=lambda: worker.log()[-3000:],
    )
    log = worker.log()
    assert "ordering start failed" in log and "UnpicklableStoreError" in log
    assert "Unrecoverable error" not in log and worker.alive, log[-3000:]
    assert len(faults.runs(app, ordered.id)) == 1
    assert len(faults.runs(app, rejected.id)) == 1


def test_store_restarted_empty_makes_the_reaper_wait_a_worker_timeout(ns, store, start_worker):
    """The store restarts empty while a live worker holds a message delivered longer than
    reliable_worker_timeout ago: the reaper judges no one until the registry is a full
    timeout old (by then the worker has re-registered and re-reported what it holds), so
    the message is not given back and runs exactly once."""
    ns, app = on_store(ns, store, reliable_worker_timeout=4, reliable_heartbeat_interval=1.5)
    worker = start_worker("faults", concurrency=1, env={"CR_REDIS_URL": store.url(0), **SLOW_BEAT})
    held = app.tasks["faults.hold"].delay(10)
    wait_for(lambda: faults.runs(app, held.id), 30, message="the task to start")
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 4.5, 10, message="the delivery to age")
    reaper = Reaper(app)
    store.kill()
    store.start()  # empty: registry, held reports and ledger are gone
    actions: list[str] = []

    def passes_until_it_ended() -> bool:
        actions.extend(r.action for r in reaper.run_pass().recoveries)
        return len(faults.runs(app, held.id)) >= 2

    try:  # the first pass runs right after the restart, before the worker's next beat
        wait_for(passes_until_it_ended, 60, interval=0.3, message=lambda: worker.log()[-3000:])
    finally:
        reaper.close()
    assert actions == [], f"the reaper gave back a live worker's message: {actions}"
    broker = redis.Redis.from_url(ns.broker_url)
    wait_for(
        lambda: broker.hlen(f"{ns.broker_keyprefix}unacked") == 0,
        10,
        message="the ack",
    )
    assert broker.llen(f"{ns.broker_keyprefix}{ns.queue}") == 0
    assert [r.split(":")[0] for r in faults.runs(app, held.id)] == ["start", "end"]


class NotRedis:
    """A TCP server on 127.0.0.1 that answers anything like a web server would."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def test_wrong_password_or_not_redis_stops_the_worker_naming_the_setting(ns, start_worker):
    locked = RedisServer(args=["--requirepass", "s3cret"]).start()
    web = NotRedis()
    try:
        urls = [
            locked.url(0).replace("redis://", "redis://:wrong-one@"),
            f"redis://127.0.0.1:{web.port}/0",
        ]
        for url in urls:
            worker = start_worker("faults", wait=False, env={"CR_REDIS_URL": url})
            wait_for(lambda w=worker: not w.alive, 60, message=lambda w=worker: w.log())
            log = worker.log()
            assert worker.proc is not None and worker.proc.returncode != 0
            assert worker.proc.returncode == 1
            named = [line for line in log.splitlines() if "reliable_redis_url" in line]
            assert len(named) == 1 and "Traceback" not in log, log
            assert "wrong-one" not in log, "the password is printed"
            assert " ready." not in log
    finally:
        web.close()
        locked.close()


def test_unreachable_store_worker_consumes_only_after_registering(ns, start_worker):
    """Nothing listens at the store's address: the worker retries with backoff, logging
    how long it has waited, and receives nothing; once Redis is there it registers and
    serves the task that waited on the queue."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = ns.app(faults.build)
    worker = start_worker("faults", wait=False, env={"CR_REDIS_URL": url})
    worker.wait_log("cannot register", timeout=60)
    waiting = ns.app(faults.build)  # the producer records runs on the broker's Redis
    task = waiting.tasks["faults.ok"].delay(7)
    wait_for(
        lambda: worker.log().count("cannot register") >= 3,
        60,
        message=lambda: worker.log()[-3000:],
    )
    log = worker.log()
    assert "unreachable for" in log and " ready." not in log and "received" not in log
    server = RedisServer(port=port).start()
    try:
        worker.wait_ready(60)
        wait_for(lambda: faults.runs(app, task.id), 30, message=lambda: worker.log()[-3000:])
        assert "registered after" in worker.log()
    finally:
        server.close()
