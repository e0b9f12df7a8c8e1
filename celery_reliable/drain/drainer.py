"""Graceful drain: on SIGTERM stop consuming, give prefetched work back, then stop in time.

Celery's own warm shutdown waits for running tasks with no deadline and keeps every
prefetched message unacknowledged until the worker has exited; a platform that SIGKILLs
the worker before then strands those messages until the broker's visibility timeout.
:class:`DrainStep` replaces the worker's SIGTERM and SIGINT handlers and, in the worker's
event loop, runs the drain:

1. stop consuming from every task queue (the queues are deselected, so a reconnect does
   not resume consuming);
2. give every prefetched-but-not-started message back to the broker at once (on Redis
   the message itself is moved from kombu's unacked set back to the head of its queue; on
   other brokers it is rejected with ``requeue=True``);
3. wait up to ``reliable_drain_timeout`` seconds for the running tasks; the moment the last
   one ends the worker stops;
4. at the deadline (or on a second SIGTERM, or a SIGINT), give the message of every task
   still running back to the broker, SIGKILL its pool process, and stop;
5. stop through Celery's warm-shutdown path, so every bootstep's ``stop``/``shutdown`` runs,
   and exit 0.

The signal handlers only record the signal and write one byte to a pipe that the event
loop watches; all the work happens in the loop.

Examples:
    >>> app.conf.reliable_drain_timeout = 25
    >>> celery_reliable.install(app)   # adds DrainStep to the worker
    # kubectl delete pod ...  -> "drain: 6 prefetched returned, waiting up to 25.0s for 2 running"
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery import bootsteps
from celery import signals as celery_signals
from celery.platforms import EX_OK
from celery.worker import state

from ..core import compat, instruments
from ..core.state import settings_of

logger = logging.getLogger(__name__)

#: Seconds between checks, while draining, whether the running tasks have all ended.
DRAIN_POLL_INTERVAL = 0.05
#: Signal sent to a pool process whose task is still running at the drain deadline.
KILL_SIGNAL = signal.SIGKILL
#: Signals that start a drain, and during a drain move straight to requeue-and-exit.
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Attribute of the WorkController holding its Drainer.
DRAINER_ATTR = "_reliable_drainer"

# Drain phases.
IDLE = "idle"
DRAINING = "draining"
SETTLING = "settling"  # waiting for an outstanding Redis BRPOP reply before stopping
STOPPING = "stopping"

#: Longest wait, in seconds, for a Redis BRPOP sent before the cancel to come back.
BRPOP_SETTLE_TIMEOUT = 2.0


def _is_redis_qos(qos: Any) -> bool:
    try:
        from kombu.transport.redis import QoS as RedisQoS
    except ImportError:  # pragma: no cover (redis is a dependency)
        return False
    return isinstance(qos, RedisQoS)


def return_messages(requests: Iterable[Any]) -> tuple[int, int]:
    """Give the messages of ``requests`` back to the broker, once each, in order.

    On Redis each message is moved from kombu's unacked hash back to the consuming end of
    its queue (``restore_by_tag(leftmost=False)``, one WATCH/MULTI transaction), so it is
    the next message consumed and the original order is kept; the local delivery record
    is then dropped. Anywhere else (AMQP) the message is rejected with ``requeue=True``,
    and the broker puts it back at its place in the queue.

    A request already acknowledged or rejected is skipped. Each request is marked
    acknowledged, so the worker will not ack or reject it again later.

    Parameters:
      requests: Celery ``Request`` objects, in delivery order.

    Returns:
      (returned, failed): how many messages went back, and how many could not be given
      back (those come back when the channel closes, or after the visibility timeout).
    """
    pending = [r for r in requests if not r.acknowledged]
    returned = failed = 0
    if pending and _is_redis_qos(getattr(pending[0].message.channel, "qos", None)):
        # RPUSH puts a restored message at the consuming end: go from last to first.
        pending.reverse()
    for request in pending:
        message = request.message
        try:
            qos: Any = getattr(message.channel, "qos", None)
            if _is_redis_qos(qos):
                qos.restore_by_tag(message.delivery_tag, leftmost=False)
                message.reject(requeue=False)  # local bookkeeping; the Redis part is a no-op
            else:
                message.reject(requeue=True)
        except Exception:
            failed += 1
            logger.exception(
                "drain: could not return the message of task %s[%s] to the broker",
                request.name,
                request.id,
            )
            continue
        request.acknowledged = True
        returned += 1
        with contextlib.suppress(Exception):
            request.send_event("task-rejected", requeue=True)
    return returned, failed


class Drainer:
    """The drain state machine of one worker process (driven by :class:`DrainStep`).

    Parameters:
      worker: the ``WorkController``.
      timeout: seconds running tasks get (``reliable_drain_timeout``).

    Examples:
        >>> drainer = Drainer(worker, timeout=25.0)
        >>> drainer.install_signal_handlers()   # SIGTERM/SIGINT now drain
        >>> drainer.register(hub)               # the loop runs the drain
    """

    def __init__(self, worker: Any, timeout: float) -> None:
        self.worker = worker
        self.timeout = timeout
        self.phase = IDLE
        self._rfd, self._wfd = os.pipe()  # not inheritable across exec (PEP 446)
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._signals: collections.deque[tuple[int, float]] = collections.deque()
        self._started_at: float | None = None
        self._running: list[Any] = []
        self._timers: list[Any] = []
        self._settle_deadline = 0.0
        self._previous_handlers: dict[int, Any] = {}
        self._hub: Any = None
        #: True while the worker's event loop runs (False while it (re)connects to the
        #: broker): only a running loop can drain.
        self.loop_live = False

    # --- signal side: record, wake the loop, nothing else ---

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT start (and escalate) the drain. Main thread only."""
        for sig in DRAIN_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs inside a signal handler: append to a deque and write one byte; both are
        # safe to interrupt any code of the loop. No logging, no locks.
        self._signals.append((signum, time.monotonic()))
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"\0")
        if not self.loop_live:
            # No event loop to drain in (the broker is unreachable, so nothing can be
            # given back either): fall back to Celery's warm shutdown, then a cold one.
            if self.phase == IDLE and (state.should_stop is None or state.should_stop is False):
                state.should_stop = EX_OK
            else:
                state.should_terminate = EX_OK

    # --- loop side ---

    def register(self, hub: Any) -> None:
        """Watch the wake-up pipe in ``hub`` (called at every event-loop (re)start)."""
        self._hub = hub
        hub.add_reader(self._rfd, self._on_wakeup)
        self.loop_live = True

    def close(self) -> None:
        """Stop watching the pipe and close it (at worker stop)."""
        self.restore_signal_handlers()
        for timer in self._timers:
            with contextlib.suppress(Exception):
                timer.cancel()
        self._timers.clear()
        if self._hub is not None:
            with contextlib.suppress(Exception):
                self._hub.remove_reader(self._rfd)
            self._hub = None
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_wakeup(self, *args: Any) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._rfd, 512):
                pass
        while self._signals:
            signum, at = self._signals.popleft()
            name = signal.Signals(signum).name
            if self.phase == IDLE:
                self.begin(name, at)
            elif self.phase == DRAINING:
                self.escalate(f"{name} received during the drain")
            else:
                logger.info("drain: %s received; already stopping", name)

    @property
    def consumer(self) -> Any:
        return self.worker.consumer

    def _elapsed(self) -> float:
        return time.monotonic() - (self._started_at or time.monotonic())

    def begin(self, signame: str = "SIGTERM", at: float | None = None) -> None:
        """Phase 1: stop consuming, return the prefetched messages, start the wait."""
        self.phase = DRAINING
        instruments.set_draining(True)
        self._started_at = at if at is not None else time.monotonic()
        logger.warning("drain: %s received; stopping consumers", signame)
        self._stop_consuming()
        returned, failed = self._return_prefetched()
        self._running = self._still_running()
        logger.warning(
            "drain: %d prefetched returned%s, waiting up to %.1fs for %d running (%.3fs in)",
            returned,
            f" ({failed} could not be returned)" if failed else "",
            self.timeout,
            len(self._running),
            self._elapsed(),
        )
        with contextlib.suppress(Exception):
            celery_signals.worker_shutting_down.send(
                sender=self.worker.hostname, sig=signame, how="Warm", exitcode=EX_OK
            )
        if not self._running:
            self.finish()
            return
        hub = self.worker.hub
        remaining = max(0.0, self.timeout - self._elapsed())
        self._timers.append(hub.call_repeatedly(DRAIN_POLL_INTERVAL, self._check))
        self._timers.append(hub.call_later(remaining, self._on_deadline))

    def _stop_consuming(self) -> None:
        c = self.consumer
        queues = c.app.amqp.queues
        names = list(queues.consume_from)
        # Deselected queues are not consumed again when the consumer reconnects.
        queues.deselect(names)
        # A remote add_consumer must not resume consuming either.
        c.add_task_queue = _refuse_add_task_queue
        if c.task_consumer is not None:
            try:
                c.task_consumer.cancel()
            except Exception:
                logger.exception("drain: could not cancel the task consumer")
        logger.info("drain: stopped consuming from %s", ", ".join(names) or "(no queues)")

    def _return_prefetched(self) -> tuple[int, int]:
        """Take every reserved request that has not reached the pool away from the
        worker, and give its message back."""
        c = self.consumer
        taken: list[Any] = []
        waiting = compat.pool_waiters(self.worker)
        if waiting:
            keep = []
            for waiter in list(waiting):
                _cb, args, _kw = waiter
                if args and hasattr(args[0], "message"):
                    taken.append(args[0])
                else:
                    keep.append(waiter)
            waiting.clear()
            waiting.extend(keep)
        for bucket in list(c.task_buckets.values()):
            contents = getattr(bucket, "contents", None)
            if contents:
                # Celery's buckets hold (request, tokens) pairs.
                items = [i[0] if isinstance(i, tuple) else i for i in list(contents)]
                taken.extend(r for r in items if hasattr(r, "message"))
                bucket.clear_pending()
        for request, entry in list(compat.eta_requests(c.timer)):
            if request in state.active_requests:
                continue
            if entry is not None and c.timer is not None:
                with contextlib.suppress(Exception):
                    c.timer.cancel(entry)
            if request not in taken:
                taken.append(request)
        for request in taken:
            state.task_ready(request)
        return return_messages(taken)

    def _still_running(self) -> list[Any]:
        running = list(state.active_requests)
        running.extend(r for r in state.reserved_requests if r not in running)
        return running

    def _check(self) -> None:
        if self.phase == SETTLING:
            self.finish()
            return
        if self.phase != DRAINING:
            return
        left = [r for r in self._running if _in_flight(r)]
        if not left:
            logger.warning(
                "drain: all %d running tasks ended after %.3fs; stopping",
                len(self._running),
                self._elapsed(),
            )
            self.finish()

    def _on_deadline(self) -> None:
        if self.phase == DRAINING:
            self.escalate(f"drain timeout of {self.timeout:.1f}s reached")

    def escalate(self, reason: str) -> None:
        """Requeue what is still running, end its pool processes, and stop."""
        if self.phase != DRAINING:
            return
        left = [r for r in self._running if _in_flight(r)]
        requeue: list[Any] = []
        lost: list[Any] = []
        for request in left:
            if request.acknowledged:
                if not request.task.acks_late:
                    lost.append(request)  # acked when it started: nothing to give back
                continue  # acks_late and already acked: it has ended, the result is in
            if request.id in state.successful_requests:
                continue
            requeue.append(request)
        for request in requeue + lost:
            self._end_process(request)
        returned, failed = return_messages(requeue)
        logger.warning(
            "drain: %s after %.3fs: %d running requeued%s, %d pool process(es) ended",
            reason,
            self._elapsed(),
            returned,
            f" ({failed} could not be returned)" if failed else "",
            len(requeue) + len(lost),
        )
        for request in lost:
            logger.warning(
                "drain: task %s[%s] is not acks_late: it was acknowledged when it started, "
                "so it was ended and is NOT requeued",
                request.name,
                request.id,
            )
        self.finish()

    def _end_process(self, request: Any) -> None:
        # Marked cancelled: the pool then reports the job as Terminated and Celery's
        # Request.on_failure returns without acking, storing a failure or retrying.
        compat.mark_cancelled(request)
        pid = request.worker_pid
        if pid:
            try:
                self.worker.pool.terminate_job(pid, KILL_SIGNAL)
            except Exception:
                logger.exception("drain: could not end pool process %s", pid)
        job = compat.apply_result(request)
        if job is not None:
            # Not accepted yet: the pool ends the process the moment it accepts the job.
            job.terminate(KILL_SIGNAL)

    def finish(self) -> None:
        """Hand over to Celery's warm shutdown (exit code 0), once no BRPOP is in flight."""
        if self.phase == STOPPING:
            return
        if self._brpop_pending():
            # On Redis a BRPOP sent before the cancel may still pop a message (one just
            # returned, or a new one). The loop gives such a message back by itself
            # (kombu requeues deliveries for a cancelled queue), so keep the loop running
            # until that reply has come in: at once when the queue has messages, and
            # within kombu's brpop_timeout (1 s) when it is empty.
            if self.phase != SETTLING:
                self.phase = SETTLING
                self._settle_deadline = time.monotonic() + BRPOP_SETTLE_TIMEOUT
                if not self._timers:
                    hub = self.worker.hub
                    self._timers.append(hub.call_repeatedly(DRAIN_POLL_INTERVAL, self._check))
                return
            if time.monotonic() < self._settle_deadline:
                return
            logger.warning("drain: a BRPOP is still outstanding; stopping anyway")
        self.phase = STOPPING
        for timer in self._timers:
            with contextlib.suppress(Exception):
                timer.cancel()
        self._timers.clear()
        # Anything that arrived after the first pass (a late delivery) goes back too.
        returned, _ = self._return_prefetched()
        if returned:
            logger.warning("drain: %d late prefetched returned", returned)
        logger.warning("drain: done after %.3fs; worker exits", self._elapsed())
        state.should_stop = EX_OK
        # Wake the loop so it sees should_stop now, not when its poll times out.
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"\0")

    def _brpop_pending(self) -> bool:
        """Whether the Redis task channel has a BRPOP in flight."""
        consumer = getattr(self.consumer, "task_consumer", None)
        channel = getattr(consumer, "channel", None)
        return compat.brpop_pending(channel)


def _in_flight(request: Any) -> bool:
    return request in state.active_requests or request in state.reserved_requests


def _refuse_add_task_queue(queue: str, *args: Any, **kwargs: Any) -> None:
    logger.warning("drain: not consuming from %s: the worker is draining", queue)


class DrainStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: SIGTERM drains the worker instead of Celery's unbounded warm shutdown.

    Installed by :func:`celery_reliable.install`. Active only in a ``celery worker``
    process with the prefork pool and an event loop (the default with Redis or RabbitMQ);
    anywhere else (embedded test workers, other pools) Celery's own shutdown is left as
    it is.

    Parameters:
      worker: the ``WorkController`` (passed by Celery).

    Examples:
        >>> app.steps["worker"].add(DrainStep)   # what install() does
    """

    label = "reliable-drain"
    requires = ("celery.worker.components:Pool", "celery.worker.components:Hub")

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.drainer: Drainer | None = None

    def start(self, worker: Any) -> None:
        from celery.apps.worker import Worker as CliWorker
        from celery.concurrency.prefork import TaskPool as PreforkPool

        if not isinstance(worker, CliWorker) or worker.hub is None:
            logger.info("drain: not active (needs a `celery worker` with an event loop)")
            return
        if not isinstance(worker.pool, PreforkPool):
            # Other pools cannot end a task at the deadline, and take requests without
            # the semaphore, so prefetched ones could not be told from running ones.
            logger.info("drain: not active with the %s pool (prefork only)", type(worker.pool))
            return
        if threading.current_thread() is not threading.main_thread():
            logger.info("drain: not active (the worker does not run in the main thread)")
            return
        timeout = settings_of(worker.app).drain_timeout
        self.drainer = Drainer(worker, timeout)
        setattr(worker, DRAINER_ATTR, self.drainer)
        self.drainer.install_signal_handlers()
        logger.info("drain: SIGTERM drains this worker (reliable_drain_timeout=%.1fs)", timeout)

    def register_with_event_loop(self, worker: Any, hub: Any) -> None:
        if self.drainer is not None:
            self.drainer.register(hub)

    def stop(self, worker: Any) -> None:
        # Runs before Pool.stop (reverse start order); Celery's own handlers are back
        # for whatever signal arrives while the pool is joined.
        if self.drainer is not None:
            self.drainer.phase = STOPPING
            self.drainer.close()
            self.drainer = None
            setattr(worker, DRAINER_ATTR, None)

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


class DrainLoopStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: tells the drainer when the event loop stops (connection lost), so a
    SIGTERM that arrives while the worker reconnects still stops it."""

    label = "reliable-drain-loop"

    def stop(self, c: Any) -> None:
        drainer = getattr(c.controller, DRAINER_ATTR, None)
        if drainer is not None:
            drainer.loop_live = False


def install(app: Any) -> None:
    """Add :class:`DrainStep` to ``app``'s worker blueprint."""
    app.steps["worker"].add(DrainStep)
    app.steps["consumer"].add(DrainLoopStep)
