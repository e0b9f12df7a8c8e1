"""Per-task cost, counted on the server: at most one store round trip at a task's start and
one at its end, whatever features the task uses; one at an ordered publish. On the Redis
broker with reliable fetch, a ReliableTask that uses no option makes none at all (its
worker's fetch record is its in-flight record); with ``reliable_fetch = False`` (as on
RabbitMQ) the in-flight ledger costs exactly one at start and one at the end.

The worker's coordination store is a ``redis-server`` of its own, so everything it serves
while tasks run is the package's per-task work: round trips from ``INFO stats``
(``total_reads_processed``: a script or a pipeline is one read) and script calls from
``INFO commandstats``. Heartbeats and sweeps are pushed out of the window.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_reliable.core.chain import NOT_RUN, ScriptCall, run_chain
from celery_reliable.core.store import store_for
from celery_reliable.ordering.extension import STATE_TTL_MS, key_names
from celery_reliable.ordering.scripts import ORD_START
from celery_reliable.orphans.scripts import LEDGER_START
from celery_reliable.testing import RedisServer, WorkerProcess, wait_for
from tests.apps import cost
from tests.apps.common import install, make_app
from tests.conftest import Namespace

#: Tasks run per combination, after WARM_UP tasks that connect the pool processes and
#: load the scripts into the server.
TASKS = 20
WARM_UP = 4
#: The most round trips a task may make to the store: one at start, one at the end.
MAX_ROUND_TRIPS = 2
QUIET = {
    "CELERY_RELIABLE_REAPER_INTERVAL": "3600",
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "3600",
    "CELERY_RELIABLE_WORKER_TIMEOUT": "7200",
}


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: Commands a client sends once per new connection (each its own round trip): a pool
#: process's first connection is not per-task work.
HANDSHAKE = ("hello", "client|setinfo", "select", "auth")


class Served:
    """What a redis-server served: round trips (minus connection handshakes) and calls per
    command, minus our own INFOs."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.infos = 0

    def snapshot(self) -> dict[str, int]:
        stats = self.client.info("stats")
        commands = self.client.info("commandstats")
        self.infos += 2
        out = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commands.items()}
        handshakes = sum(out.get(name, 0) for name in HANDSHAKE)
        out["round_trips"] = int(stats["total_reads_processed"]) - self.infos - handshakes
        return out

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@pytest.fixture
def coordination(ns: Namespace) -> Iterator[RedisServer]:
    server = RedisServer().start()
    ns.redis_url = server.url(0)
    ns.extra_env["CR_COUNT_URL"] = ns.broker_url
    try:
        yield server
    finally:
        server.close()


def test_a_chain_is_one_round_trip_and_stops_at_a_closed_gate(
    ns: Namespace, coordination: RedisServer
) -> None:
    """ordering parks the task (its gate says no): the ledger step after it does not run,
    and both together were one round trip."""
    app = ns.app(cost.build)
    store = store_for(app)
    served = Served(redis.Redis.from_url(coordination.url(0)))
    keys = key_names(store, "g", "k")
    ledger = [store.key("led"), store.key("workers"), store.key("rec")]

    def chain(seq: int) -> list[Any]:
        return run_chain(
            store,
            [
                ScriptCall(ORD_START, keys, [seq, 60_000, "{}", STATE_TTL_MS], gate=True),
                ScriptCall(LEDGER_START, ledger, ["w", f"t{seq}", "{}"]),
            ],
        )

    run_chain(store, [])  # nothing to run: no round trip
    assert chain(1)[0] == ["run", 1]  # loads the chain script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
    before = served.snapshot()
    replies = chain(3)  # #2 holds the turn next: #3 is parked
    spent = Served.delta(before, served.snapshot())
    assert replies == [["park"], NOT_RUN]
    assert spent["round_trips"] == 1 and spent["evalsha"] == 1
    assert store.client.hkeys(ledger[0]) == ["t1"], "no ledger entry for the parked task"
    assert store.client.hexists(keys[1], "3"), "the parked task's signature is stored"


def run_all(
    app: Any, served: Served, combo: str, tasks: int, counter: redis.Redis
) -> dict[str, int]:
    """What the store served for ``tasks`` publishes of ``cost.<combo>`` (one ordering key
    each) and, apart, for running them until they were acknowledged.

    The publishes are counted first on a queue nobody consumes (then dropped); the runs are
    what the same publishes to the worker's queue cost on top of that."""
    task = app.tasks[f"cost.{combo}"]
    prefix = app.conf.broker_transport_options["global_keyprefix"]
    idle = f"{app.conf.task_default_queue}-idle"
    before = served.snapshot()
    for i in range(tasks):
        task.apply_async((i, f"idle-{combo}-{i}"), queue=idle)
    published = Served.delta(before, served.snapshot())
    counter.delete(prefix + idle)
    key = cost.count_key(app)
    counter.delete(key)
    before = served.snapshot()
    for i in range(tasks):
        task.apply_async((i, f"{combo}-{i}"))
    wait_for(
        lambda: int(counter.get(key) or 0) >= tasks and not counter.hlen(f"{prefix}unacked"),
        30,
        interval=0.01,
        message=f"{tasks} cost.{combo} tasks run and acknowledged (so their ends are done)",
    )
    spent = Served.delta(before, served.snapshot())
    ran = {k: v - published.get(k, 0) for k, v in spent.items()}
    ran["published_round_trips"] = published.get("round_trips", 0)
    return ran


def measure(
    ns: Namespace,
    start_worker: Callable[..., WorkerProcess],
    coordination: RedisServer,
    env: dict[str, str],
) -> dict[str, dict[str, int]]:
    """What the coordination store served for TASKS runs of every combination."""
    app = ns.app(cost.build)
    start_worker("cost", env={**QUIET, **env})
    served = Served(redis.Redis.from_url(coordination.url(0)))
    counter = redis.Redis.from_url(ns.broker_url)
    combos = [*cost.COMBINATIONS, "failing"]
    for combo in combos:  # both pool processes connect; every chain is loaded
        run_all(app, served, combo, WARM_UP, counter)
    return {combo: run_all(app, served, combo, TASKS, counter) for combo in combos}


def check_budget(report: dict[str, dict[str, int]]) -> dict[str, float]:
    """Every combination within MAX_ROUND_TRIPS per task and the publishes as expected;
    returns the round trips per task of each combination."""
    per_task = {
        combo: {k: v / TASKS for k, v in spent.items() if k in ("round_trips", "evalsha")}
        for combo, spent in report.items()
    }
    for combo, spent in report.items():
        served_text = str(sorted(spent.items()))
        assert spent.get("round_trips", 0) <= MAX_ROUND_TRIPS * TASKS, (combo, served_text)
        assert spent.get("evalsha", 0) <= MAX_ROUND_TRIPS * TASKS, (combo, per_task)
    # an ordered publish takes its place in one round trip; the others cost none
    published = {combo: spent["published_round_trips"] for combo, spent in report.items()}
    assert published == {
        "none": 0,
        "ordered": TASKS,
        "rate": 0,
        "breaker": 0,
        "every": TASKS,
        "failing": TASKS,
    }
    print(f"\nround trips per task: {per_task}")
    return {combo: p.get("round_trips", 0.0) for combo, p in per_task.items()}


def test_every_combination_makes_at_most_one_round_trip_at_start_and_one_at_end(
    ns: Namespace,
    coordination: RedisServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """Redis broker, reliable fetch (the default). No option, ordering, rate limit,
    breaker, all three, and all three with a failing body (whose end also reports to the
    breaker): at most one script call at start and one at the end, an ordered publish one
    more, in the producer; a task that uses no option costs the store nothing."""
    report = measure(ns, start_worker, coordination, {})
    per_task = check_budget(report)
    assert per_task["none"] == 0, report["none"]  # the fetch record is its in-flight record
    assert not any(k.startswith("eval") for k in report["none"]), report["none"]
    # a feature's own scripts still run: ordering at both ends, the bucket at start
    assert per_task["ordered"] == MAX_ROUND_TRIPS and per_task["every"] == MAX_ROUND_TRIPS
    assert per_task["rate"] >= 1, report["rate"]


def test_without_reliable_fetch_the_ledger_records_every_task(
    ns: Namespace,
    coordination: RedisServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """``reliable_fetch = False`` (kombu's BRPOP, as the ledger works on RabbitMQ): every
    ReliableTask is in the in-flight ledger, exactly one chain at start and one at end."""
    report = measure(ns, start_worker, coordination, {"CELERY_RELIABLE_FETCH": "0"})
    per_task = check_budget(report)
    assert all(n == MAX_ROUND_TRIPS for n in per_task.values()), per_task


@pytest.mark.amqp
def test_on_rabbitmq_the_ledger_records_every_task(
    ns: Namespace,
    coordination: RedisServer,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    """RabbitMQ has no fetch record: a no-option ReliableTask is recorded in the in-flight
    ledger, one script at start and one at the end, as before."""
    queue = ns.queue = f"q-cost-{uuid.uuid4().hex[:10]}"
    app = install(cost.build(make_app("producer", AMQP_URL, ns.redis_url, ns.prefix, queue)))
    counter = redis.Redis.from_url(ns.broker_url)  # the Redis the tasks count on
    key = cost.count_key(app)
    try:
        # the node name unique on the shared RabbitMQ (its pidbox queue is exclusive)
        start_worker("cost", name=f"w1-{queue}", env={**QUIET, "CR_BROKER_URL": AMQP_URL})
        served = Served(redis.Redis.from_url(coordination.url(0)))
        task = app.tasks["cost.none"]
        for i in range(WARM_UP):
            task.delay(i, "warm")
        wait_for(lambda: int(counter.get(key) or 0) >= WARM_UP, 30, message="warm-up")
        before = served.snapshot()
        ends = before["round_trips"] + MAX_ROUND_TRIPS * TASKS
        # the warm-up's ends may still be running: they are counted from `before` on too
        for i in range(TASKS):
            task.delay(i, "measured")
        wait_for(
            lambda: (
                int(counter.get(key) or 0) == WARM_UP + TASKS
                and served.snapshot()["round_trips"] >= ends
            ),
            30,
            interval=0.05,
            message=lambda: f"{TASKS} tasks run, and their ledger scripts: {served.snapshot()}",
        )
        spent = Served.delta(before, served.snapshot())
        assert spent.get("evalsha", 0) >= MAX_ROUND_TRIPS * TASKS, spent
    finally:
        counter.delete(key)
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
