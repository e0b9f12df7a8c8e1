"""Guarantee 6 (drain): on SIGTERM a worker stops consuming, gives its prefetched messages
back within a second, lets running tasks finish within ``reliable_drain_timeout``, requeues
what is still running at the deadline, and exits 0. Every task ends exactly once.

Timings are printed as ``DRAIN-TIMING`` lines (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis

from celery_reliable.testing import wait_for
from tests.apps import drain
from tests.apps.common import events

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: How fast prefetched messages must be back on the broker after SIGTERM.
RETURN_DEADLINE = 1.0
#: Poll interval while timing the broker side.
FAST_POLL = 0.01
#: Celery's own shutdown after the drain is done (pool join: each billiard child sleeps
#: 1 s after reporting its exit; the join polls every 0.5 s): ~1.5 s on an idle machine,
#: up to ~2.8 s measured with both cores loaded (docs/drain.md).
CELERY_SHUTDOWN_BUDGET = 3.0


def _timing(label: str, **values: float) -> None:
    text = ", ".join(f"{k}={v:.3f}s" for k, v in values.items())
    print(f"\nDRAIN-TIMING {label}: {text}")


def _count(app, event: str) -> Counter[str]:
    return Counter(e["id"] for e in events(app, event))


def _assert_each_once(app, ids: list[str]) -> None:
    succeeded = _count(app, "succeeded")
    assert sorted(succeeded) == sorted(ids), "every task succeeded"
    assert all(n == 1 for n in succeeded.values()), f"succeeded more than once: {succeeded}"


class RedisBroker:
    """Depth of the test's queue and of kombu's unacked hash on the Redis broker."""

    def __init__(self, ns) -> None:
        self.client = redis.Redis.from_url(ns.broker_url)
        self.queue_key = ns.broker_keyprefix + ns.queue
        self.unacked_key = ns.broker_keyprefix + "unacked"

    def ready(self) -> int:
        return int(self.client.llen(self.queue_key))

    def unacked(self) -> int:
        return int(self.client.hlen(self.unacked_key))

    def close(self) -> None:
        self.client.close()


class AmqpBroker:
    """Ready-message count of the test's queue on RabbitMQ (passive queue.declare)."""

    def __init__(self, app, queue: str) -> None:
        self.queue = queue
        self.conn = app.connection_for_write()
        self.channel = self.conn.channel()

    def ready(self) -> int:
        return int(self.channel.queue_declare(queue=self.queue, passive=True).message_count)

    def close(self) -> None:
        self.conn.release()


def _rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def amqp_ns(ns) -> Iterator:
    """The test namespace, with RabbitMQ as the broker (results/events stay on Redis)."""
    if not _rabbitmq_up():
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
    ns.broker_url = AMQP_URL
    yield ns
    from tests.apps.common import make_app

    app = make_app("cleanup", AMQP_URL, ns.redis_url, ns.prefix, ns.queue)
    with app.connection_for_write() as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(ns.queue)


def _drain_with_running_and_prefetched(
    ns, start_worker, label: str, broker_factory: Callable[[object], object]
) -> None:
    """Two long tasks running; seven prefetched: four ReliableTasks, two plain tasks and
    one with a countdown (held by the worker until its ETA)."""
    app = ns.app(drain.build)
    env = {"CR_PREFETCH": "4", "CELERY_RELIABLE_DRAIN_TIMEOUT": "15"}
    w1 = start_worker("drain", name="w1", env=env)
    broker = broker_factory(app)
    try:
        long_ids = [app.tasks["drain.sleep"].delay(3.0, tag="long").id for _ in range(2)]
        wait_for(lambda: len(events(app, "started")) == 2, 20, message="both long tasks started")
        # The ETA one first: receiving it raises the prefetch limit by one (Celery does
        # that for ETA tasks), so all seven fit in the window of 2 x 4.
        eta = app.tasks["drain.sleep"].apply_async((0.05,), {"tag": "eta"}, countdown=3)
        prefetched = [eta.id]
        prefetched += [app.tasks["drain.sleep"].delay(0.05, tag="short").id for _ in range(4)]
        prefetched += [app.tasks["drain.plain"].delay(0.05, tag="plain").id for _ in range(2)]
        wait_for(lambda: broker.ready() == 0, 10, message="all seven prefetched by w1")
        if isinstance(broker, RedisBroker):
            wait_for(lambda: broker.unacked() == 9, 10, message="9 unacked on w1")

        t0 = time.monotonic()
        w1.terminate()
        wait_for(
            lambda: broker.ready() == 7,
            RETURN_DEADLINE + 4,
            FAST_POLL,
            message=lambda: f"7 prefetched back on the broker (have {broker.ready()})",
        )
        t_back = time.monotonic() - t0
        code = w1.wait_exit(20)
        t_exit = time.monotonic() - t0
        after_last = time.time() - max(e["t"] for e in events(app, "succeeded"))

        assert t_back < RETURN_DEADLINE, f"prefetched back after {t_back:.3f}s"
        assert code == 0, w1.log()[-3000:]
        assert t_exit < 15.0, f"exited after {t_exit:.3f}s"
        assert "drain: 7 prefetched returned" in w1.log()
        assert sorted(_count(app, "succeeded")) == sorted(long_ids), "both running finished"
        assert sorted(_count(app, "started")) == sorted(long_ids), "no prefetched one started"
        assert broker.ready() == 7
        if isinstance(broker, RedisBroker):
            assert broker.unacked() == 0, "nothing left for the visibility timeout"
        _timing(label, prefetched_back=t_back, exit=t_exit, exit_after_last_task=after_last)

        start_worker("drain", name="w2")
        wait_for(
            lambda: len(events(app, "succeeded")) == 9, 20, message="w2 ran the prefetched seven"
        )
        _assert_each_once(app, long_ids + prefetched)
        assert all(n == 1 for n in _count(app, "started").values())
    finally:
        broker.close()


def test_sigterm_returns_prefetched_within_a_second_and_waits_for_running(ns, start_worker):
    _drain_with_running_and_prefetched(ns, start_worker, "redis", lambda app: RedisBroker(ns))


def test_task_longer_than_drain_timeout_is_requeued_and_completed_elsewhere(ns, start_worker):
    app = ns.app(drain.build)
    broker = RedisBroker(ns)
    w1 = start_worker("drain", name="w1", env={"CELERY_RELIABLE_DRAIN_TIMEOUT": "2"})
    task_id = app.tasks["drain.long_once"].delay(60.0, 0.05, tag="long").id
    wait_for(lambda: len(events(app, "started")) == 1, 20, message="the long task started")

    t0 = time.monotonic()
    w1.terminate()
    wait_for(lambda: broker.ready() == 1, 6, FAST_POLL, message="the long task requeued")
    t_requeued = time.monotonic() - t0
    code = w1.wait_exit(10)
    t_exit = time.monotonic() - t0
    assert code == 0, w1.log()[-3000:]
    assert 2.0 <= t_requeued < 3.0, f"requeued after {t_requeued:.3f}s (drain timeout 2 s)"
    # the drain's own part ends at the deadline; what follows is Celery's pool shutdown
    assert t_exit - t_requeued < CELERY_SHUTDOWN_BUDGET, (
        f"exited {t_exit - t_requeued:.3f}s after the requeue ({t_exit:.3f}s after SIGTERM)"
    )
    assert broker.unacked() == 0
    assert "drain timeout of 2.0s reached" in w1.log()
    assert "1 running requeued" in w1.log()
    assert not events(app, "succeeded")
    _timing("redis-timeout", requeued=t_requeued, exit=t_exit)

    start_worker("drain", name="w2")
    wait_for(lambda: events(app, "succeeded"), 20, message="w2 completed the requeued task")
    _assert_each_once(app, [task_id])
    assert _count(app, "started")[task_id] == 2, "one interrupted run, one complete run"
    broker.close()


def _second_signal_requeues_at_once(ns, start_worker, broker, app, sig: int, label: str) -> None:
    w1 = start_worker("drain", name="w1", env={"CELERY_RELIABLE_DRAIN_TIMEOUT": "30"})
    long_ids = [app.tasks["drain.long_once"].delay(60.0, 0.05, tag="long").id for _ in range(2)]
    wait_for(lambda: len(events(app, "started")) == 2, 20, message="both long tasks started")
    short = [app.tasks["drain.sleep"].delay(0.05, tag="short").id for _ in range(2)]
    wait_for(lambda: broker.ready() == 0, 10, message="both short ones prefetched")
    if isinstance(broker, RedisBroker):
        wait_for(lambda: broker.unacked() == 4, 10, message="4 unacked on w1")

    t0 = time.monotonic()
    w1.terminate()
    wait_for(lambda: broker.ready() == 2, 5, FAST_POLL, message="2 prefetched back")
    t_back = time.monotonic() - t0
    t1 = time.monotonic()
    w1.signal(sig)
    wait_for(lambda: broker.ready() == 4, 5, FAST_POLL, message="2 running requeued")
    t_requeued = time.monotonic() - t1
    code = w1.wait_exit(10)
    t_exit = time.monotonic() - t1
    assert code == 0, w1.log()[-3000:]
    assert t_back < RETURN_DEADLINE
    assert t_requeued < RETURN_DEADLINE, f"requeued {t_requeued:.3f}s after the 2nd signal"
    assert t_exit < CELERY_SHUTDOWN_BUDGET, f"exited {t_exit:.3f}s after the second signal"
    assert f"{signal.Signals(sig).name} received during the drain" in w1.log()
    _timing(label, prefetched_back=t_back, requeued_after_2nd=t_requeued, exit_after_2nd=t_exit)

    start_worker("drain", name="w2")
    wait_for(lambda: len(events(app, "succeeded")) == 4, 20, message="w2 ran all four")
    _assert_each_once(app, long_ids + short)
    started = _count(app, "started")
    assert all(started[i] == 2 for i in long_ids) and all(started[i] == 1 for i in short)


def test_sigint_during_drain_requeues_running_at_once(ns, start_worker):
    app = ns.app(drain.build)
    broker = RedisBroker(ns)
    try:
        _second_signal_requeues_at_once(
            ns, start_worker, broker, app, signal.SIGINT, "redis-sigint"
        )
        # w2 records 'succeeded' inside the task body and acks right after: wait for the ack
        wait_for(lambda: broker.unacked() == 0, 10, message="w2's last ack")
    finally:
        broker.close()


@pytest.mark.amqp
def test_amqp_sigterm_returns_prefetched_within_a_second_and_waits_for_running(
    amqp_ns, start_worker
):
    _drain_with_running_and_prefetched(
        amqp_ns, start_worker, "amqp", lambda app: AmqpBroker(app, amqp_ns.queue)
    )


@pytest.mark.amqp
def test_amqp_second_sigterm_requeues_running_at_once(amqp_ns, start_worker):
    app = amqp_ns.app(drain.build)
    broker = AmqpBroker(app, amqp_ns.queue)
    try:
        _second_signal_requeues_at_once(
            amqp_ns, start_worker, broker, app, signal.SIGTERM, "amqp-2nd-sigterm"
        )
    finally:
        broker.close()


def test_sigterm_while_the_broker_is_down_still_stops_the_worker(ns, start_worker):
    """No event loop runs while the worker reconnects: SIGTERM falls back to Celery's
    warm shutdown instead of waiting for a drain that cannot start."""
    w1 = start_worker("drain", name="w1")
    ns.redis.kill()
    try:
        w1.wait_log("Cannot connect", 15)
        t0 = time.monotonic()
        w1.terminate()
        code = w1.wait_exit(15)
        t_exit = time.monotonic() - t0
    finally:
        ns.redis.start()
    assert code == 0, w1.log()[-3000:]
    _timing("redis-broker-down", exit=t_exit)


@pytest.mark.amqp
def test_amqp_broker_requeues_running_tasks_when_a_draining_worker_is_killed(amqp_ns, start_worker):
    """What RabbitMQ does by itself: a platform SIGKILL during the drain closes the
    connection, and the broker requeues the unacked messages of the running tasks."""
    app = amqp_ns.app(drain.build)
    broker = AmqpBroker(app, amqp_ns.queue)
    try:
        w1 = start_worker("drain", name="w1", env={"CELERY_RELIABLE_DRAIN_TIMEOUT": "30"})
        ids = [app.tasks["drain.long_once"].delay(60.0, 0.05).id for _ in range(2)]
        ids += [app.tasks["drain.sleep"].delay(0.05).id for _ in range(2)]
        wait_for(lambda: len(events(app, "started")) == 2, 20, message="2 long tasks started")
        wait_for(lambda: broker.ready() == 0, 10, message="both short ones prefetched")
        w1.terminate()
        wait_for(lambda: broker.ready() == 2, 5, FAST_POLL, message="2 prefetched back")
        t0 = time.monotonic()
        w1.kill9()
        wait_for(lambda: broker.ready() == 4, 10, FAST_POLL, message="broker requeued 2")
        t_requeued = time.monotonic() - t0
        _timing("amqp-sigkill-during-drain", broker_requeued=t_requeued)

        start_worker("drain", name="w2")
        wait_for(lambda: len(events(app, "succeeded")) == 4, 20, message="w2 ran all four")
        _assert_each_once(app, ids)
    finally:
        broker.close()


def test_requests_held_by_a_rate_limit_are_returned(ns, start_worker):
    """Requests parked in Celery's rate-limit bucket have not started: they go back too."""
    app = ns.app(drain.build)
    broker = RedisBroker(ns)
    try:
        w1 = start_worker("drain", name="w1")
        ids = [app.tasks["drain.limited"].delay(tag=str(i)).id for i in range(3)]
        wait_for(lambda: events(app, "succeeded"), 20, message="the first one ran")
        wait_for(
            lambda: broker.ready() == 0 and broker.unacked() == 2, 10, message="2 parked on w1"
        )
        t0 = time.monotonic()
        w1.terminate()
        wait_for(lambda: broker.ready() == 2, 5, FAST_POLL, message="2 parked ones back")
        t_back = time.monotonic() - t0
        assert w1.wait_exit(10) == 0
        assert t_back < RETURN_DEADLINE
        assert broker.unacked() == 0
        ran = [e["id"] for e in events(app, "started")]
        assert len(ran) == 1 and ran[0] in ids
        _timing("redis-rate-limited", returned=t_back)
    finally:
        broker.close()


def test_plain_tasks_at_the_deadline(ns, start_worker):
    """A plain acks_late task is requeued at the deadline with no failure recorded; a
    plain task that is not acks_late was acked when it started: it is ended, not requeued,
    and the log names it."""
    app = ns.app(drain.build)
    broker = RedisBroker(ns)
    try:
        w1 = start_worker("drain", name="w1", env={"CELERY_RELIABLE_DRAIN_TIMEOUT": "1"})
        late = app.tasks["drain.plain_late"].delay(60.0, 0.05).id
        early = app.tasks["drain.plain"].delay(60.0).id
        wait_for(lambda: len(events(app, "started")) == 2, 20, message="both started")
        w1.terminate()
        assert w1.wait_exit(10) == 0
        log = w1.log()
        assert broker.ready() == 1 and broker.unacked() == 0, "only the acks_late one is back"
        assert f"drain.plain[{early}] is not acks_late" in log
        assert "1 running requeued, 2 pool process(es) ended" in log
        assert "WorkerLostError" not in log and "raised error" not in log

        start_worker("drain", name="w2")
        wait_for(lambda: events(app, "succeeded"), 20, message="w2 ran the acks_late one")
        assert [e["id"] for e in events(app, "succeeded")] == [late]
    finally:
        broker.close()
