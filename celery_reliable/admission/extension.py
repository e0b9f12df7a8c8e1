"""Admission control: global rate limits and shared circuit breakers at task start.

One :class:`AdmissionExtension` (``ORDER_ADMISSION``) runs in the pool process before the
body of every ReliableTask that sets ``global_rate_limit`` or ``breaker``. Its ONE script
(``admit.lua``, which decides breaker and bucket together) rides in the task's one store
round trip at start, with the other features' scripts, and either
lets the task run or defers it: the task is re-published with a countdown equal to the
wait the script computed (its reserved token slot, or the end of the breaker's reset
timeout) and :class:`~celery_reliable.core.extensions.Deferred` is raised, so the message is
acknowledged, no retry is counted and no pool slot is held while it waits (the worker
holds the ETA message in its timer, outside the prefetch limit). Tasks using neither
feature pay nothing. See docs/rate-limits.md and docs/circuit-breakers.md.

Examples:
    >>> @app.task(base=ReliableTask, bind=True, global_rate_limit="20/s", breaker="vendor")
    ... def call_vendor(self, tenant): ...
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps

from ..core import instruments
from ..core.chain import ScriptCall
from ..core.extensions import ORDER_ADMISSION, Deferred, Outcome
from ..core.state import add_extension, settings_of
from ..core.store import RedisStore, store_for
from ..errors import ReliableError
from ..task import ReliableTask, reason_text, requeue
from .breaker import HALF_OPEN_RECHECK_SECONDS, BreakerSpec, observe, outcome_kind
from .ratelimit import MAX_RESERVATION_SECONDS, SHORT_WAIT_SECONDS, BucketSpec
from .scripts import ADMIT, BREAKER_REPORT
from .timers import TimerPaceStep

logger = logging.getLogger(__name__)

#: Message header carrying a reserved token slot (Redis time, µs) of a deferred task.
SLOT_HEADER = "x-reliable-slot"
#: Message header naming a deferred copy; Redis remembers the newest copy of each task id
#: so an older message redelivered after a crash (deferred, but not yet acked) is dropped.
COPY_HEADER = "x-reliable-copy"
#: Suffix of the dead-letter id of a dropped stale copy (the task's own id stays free).
STALE_COPY_ID_SUFFIX = "-stale-copy"
#: Redis remembers the newest deferred copy of a task for the broker's visibility timeout
#: (after which kombu redelivers an unacked original) plus the wait plus this margin.
COPY_MEMORY_MARGIN = 300.0
#: The Redis transport's visibility timeout when ``broker_transport_options`` sets none.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: With ``reliable_fail_open=False``, a task that cannot reach Redis is deferred this long.
FAIL_CLOSED_DELAY = 5.0
#: At most one "Redis unreachable" warning per process in this many seconds.
OUTAGE_LOG_INTERVAL = 10.0
#: Hash tag shared by every admission key, so one script can read a bucket and a breaker
#: together (on Redis Cluster they all live in one slot; each is one small hash).
TAG = "{adm}"
#: A bucket unused for this many seconds leaves the index ``status`` reads (its hash has
#: expired by then: a full bucket is forgotten a minute after its last reservation).
BUCKET_INDEX_HORIZON = MAX_RESERVATION_SECONDS + 300.0
#: ``celery reliable status`` shows at most this many buckets (the ones used last).
STATUS_BUCKETS = 100
#: ... and at most this many breakers (the ones reported to last).
STATUS_BREAKERS = 1000

_US = 1_000_000
#: Largest token slot (µs) an ``x-reliable-slot`` header may hold: exact in Lua's numbers.
MAX_SLOT_US = 2**53


def header_slot(value: Any) -> int:
    """The token slot an ``x-reliable-slot`` header holds (µs); 0, as if absent, for
    anything but a whole non-negative number up to :data:`MAX_SLOT_US` (a header set by
    another producer, or a hostile one, must neither fail the start nor reach Redis)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if not math.isfinite(value) or not 0 <= value <= MAX_SLOT_US:
        return 0
    return int(value)


def header_copy(value: Any) -> str:
    """The copy token an ``x-reliable-copy`` header holds; "" (no copy) unless text."""
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Admission:
    """What admission control knows about one task class."""

    bucket: BucketSpec | None
    breaker: BreakerSpec | None


@dataclass
class _Ticket:
    """Per-run state kept on the request between ``before_start`` and ``after_return``."""

    probe: bool
    fails: int


def admission_of(task: Any) -> Admission:
    """Validated admission options of ``task`` (both None when it uses neither).

    Raises:
        ConfigurationError: naming the invalid option and the task.
    """
    return Admission(BucketSpec.for_task(task), BreakerSpec.for_task(task))


def bucket_key(store: RedisStore, bucket: str) -> str:
    return store.key(TAG, "bucket", bucket)


def breaker_key(store: RedisStore, name: str) -> str:
    return store.key(TAG, "breaker", name)


def bucket_index_key(store: RedisStore) -> str:
    """ZSET bucket name -> last use (µs): what ``status`` reads instead of scanning."""
    return store.key(TAG, "buckets")


def breaker_index_key(store: RedisStore) -> str:
    """ZSET breaker name -> last report (µs): what ``status`` reads instead of scanning."""
    return store.key(TAG, "breakers")


def copy_key(store: RedisStore, task_id: str, nesting: int = 0) -> str:
    """Key holding the token of the newest deferred copy of one task.

    ``Task.replace()`` gives the replacement the replaced task's id, one replacement level
    deeper (``replaced_task_nesting``): each level has its own key, so a replacement is a
    new task there, never an older copy of the task it replaced.
    """
    return store.key(TAG, "copy", f"{task_id}:{nesting}" if nesting else task_id)


def started_copy_key(store: RedisStore, task_id: str, nesting: int = 0) -> str:
    """Key holding the token of the newest message of one deferred task that was admitted.

    While it differs from :func:`copy_key`'s token, the newest copy has not started (and
    may never have been published); an older message then runs in its place.
    """
    return copy_key(store, task_id, nesting) + ":started"


def replacement_level(request: Any) -> int:
    """How many ``Task.replace()`` calls led to this request (0 for a published task)."""
    return int(getattr(request, "replaced_task_nesting", 0) or 0)


class StaleCopy(ReliableError):
    """A message dropped as an older copy of a deferred task (recorded as a dead letter)."""


class AdmissionExtension:
    """The task extension that gates ReliableTasks on their bucket and breaker.

    Parameters:
      app: the Celery app (its settings give ``reliable_fail_open``).
    """

    name = "admission"
    order = ORDER_ADMISSION

    def __init__(self, app: Any) -> None:
        self.app = app
        self._specs: dict[str, Admission] = {}
        self._last_outage_log = 0.0

    def spec(self, task: Any) -> Admission:
        spec = self._specs.get(task.name)
        if spec is None:
            spec = self._specs[task.name] = admission_of(task)
        return spec

    def applies(self, task: ReliableTask) -> bool:
        spec = self.spec(task)
        return spec.bucket is not None or spec.breaker is not None

    def start_calls(
        self, task: ReliableTask, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Sequence[ScriptCall]:
        spec = self.spec(task)
        store = store_for(self.app)
        request = task.request
        headers = request.headers or {}
        level = replacement_level(request)
        keys = [copy_key(store, request.id, level), started_copy_key(store, request.id, level)]
        # ARGV of admit.lua by position (see its header); filled in per feature below
        argv: list[Any] = ["0", 0, 0, 0, "0", 0, 0, request.id, 0, 0, "", 0, "", 0]
        argv[10] = header_copy(headers.get(COPY_HEADER))
        if spec.bucket is not None:
            bucket = spec.bucket.bucket_name(args, kwargs, task)
            keys += [bucket_key(store, bucket), bucket_index_key(store)]
            held = header_slot(headers.get(SLOT_HEADER))
            argv[0:4] = ["1", spec.bucket.interval_us, spec.bucket.burst, held]
            argv[8] = int(MAX_RESERVATION_SECONDS * _US)
            argv[11] = int(SHORT_WAIT_SECONDS * _US)
            argv[12:14] = [bucket, int(BUCKET_INDEX_HORIZON * _US)]
        if spec.breaker is not None:
            keys.append(breaker_key(store, spec.breaker.name))
            argv[4:7] = [
                "1",
                int(spec.breaker.reset_timeout * _US),
                int(spec.breaker.probe_lease * _US),
            ]
            argv[9] = int(HALF_OPEN_RECHECK_SECONDS * _US)
        return (ScriptCall(ADMIT, keys, argv, gate=True),)

    def started(
        self,
        task: ReliableTask,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        replies: Sequence[Any],
    ) -> None:
        spec = self.spec(task)
        request = task.request
        (reply,) = replies
        if isinstance(reply, Exception):  # the store error that stopped the phase
            instruments.store_error("admission")
            self._redis_unreachable(task, reply)
            return
        verdict, wait_us, slot_us, state, probe, fails, trans, claimed = reply
        if claimed:
            logger.warning(
                "celery_reliable: %s[%s] came back after a deferral whose copy has not "
                "started (a crash between recording and publishing it, or before the ack): "
                "this message takes the copy's place, and the copy, if it was published, "
                "will be dropped as stale",
                task.name,
                request.id,
            )
        if spec.breaker is not None:
            if trans:
                logger.warning(
                    "celery_reliable: breaker %r open -> half-open: %s[%s] is the probe",
                    spec.breaker.name,
                    task.name,
                    request.id,
                )
            observe(spec.breaker, state, int(fails))
        if verdict == "stale":
            drop_stale_copy(task)
        if verdict == "run":
            request._reliable_ticket = _Ticket(probe=bool(probe), fails=int(fails))
            if wait_us:  # a start booked a few ms ahead (<= SHORT_WAIT_SECONDS)
                time.sleep(int(wait_us) / _US)
            return
        reason = "rate limit" if verdict == "bucket" else f"breaker {state}"
        defer(task, args, kwargs, int(wait_us) / _US, int(slot_us), reason)

    def end_calls(self, task: ReliableTask, outcome: Outcome) -> Sequence[ScriptCall]:
        spec = self.spec(task).breaker
        ticket: _Ticket | None = getattr(task.request, "_reliable_ticket", None)
        if spec is None or ticket is None:
            return ()
        kind = outcome_kind(spec, outcome.exc, outcome.kind)
        if not ticket.probe and (kind == "release" or (kind == "success" and ticket.fails == 0)):
            return ()  # nothing to change: no script
        store = store_for(self.app)
        return (
            ScriptCall(
                BREAKER_REPORT,
                [breaker_key(store, spec.name), breaker_index_key(store)],
                [kind, task.request.id, spec.fail_max, spec.name],
            ),
        )

    def ended(self, task: ReliableTask, outcome: Outcome, replies: Sequence[Any]) -> None:
        spec = self.spec(task).breaker
        if spec is None or not replies:
            return
        (reply,) = replies
        kind = outcome_kind(spec, outcome.exc, outcome.kind)
        if isinstance(reply, Exception):  # the store error that stopped the phase
            instruments.store_error("breaker_report")
            logger.warning(
                "celery_reliable: could not report %s of %s[%s] to breaker %r: %r",
                kind,
                task.name,
                task.request.id,
                spec.name,
                reply,
            )
            return
        state, fails, opened_at, trans = reply
        if trans:
            logger.warning(
                "celery_reliable: breaker %r -> %s (%s of %s[%s], %d consecutive failures)",
                spec.name,
                trans,
                kind,
                task.name,
                task.request.id,
                int(fails),
            )
        observe(spec, state, int(fails), int(opened_at))

    def _redis_unreachable(self, task: ReliableTask, exc: Exception) -> None:
        fail_open = settings_of(self.app).fail_open
        now = time.monotonic()
        if now - self._last_outage_log >= OUTAGE_LOG_INTERVAL:
            self._last_outage_log = now
            logger.warning(
                "celery_reliable: Redis unreachable at start of %s[%s] (%r); %s "
                "(reliable_fail_open=%s)",
                task.name,
                task.request.id,
                exc,
                "running it without rate limit or breaker"
                if fail_open
                else f"deferring it {FAIL_CLOSED_DELAY:g} s",
                fail_open,
            )
        if not fail_open:
            defer(task, None, None, FAIL_CLOSED_DELAY, 0, "redis unreachable")


def defer(
    task: ReliableTask,
    args: tuple[Any, ...] | None,
    kwargs: dict[str, Any] | None,
    delay: float,
    slot_us: int,
    reason: str,
) -> None:
    """Re-publish the running task to start in ``delay`` seconds, then raise Deferred.

    The copy keeps the task id, the retry count and every header; ``slot_us`` (when not 0)
    is the token slot the copy holds, sent as the ``x-reliable-slot`` header. Before the
    publish, Redis records the copy as the task's newest (a second round trip, on this slow
    path only), so the copy is known even when a worker starts it at once. If a crash
    redelivers the message being deferred, the first of the two to be admitted runs and
    the other is dropped as stale: the copy, once it started; else this message, which
    then takes the place of a copy that may never have been published.

    Raises:
        Deferred: always, after the copy was published (the message is then acked).
        Reject: requeue, when the copy could not be published (nothing is lost).
    """
    request = task.request
    headers = {
        k: v for k, v in (request.headers or {}).items() if k not in (SLOT_HEADER, COPY_HEADER)
    }
    if slot_us:
        headers[SLOT_HEADER] = slot_us
    token = uuid.uuid4().hex
    headers[COPY_HEADER] = token
    # The copy is recorded as the task's newest BEFORE it is published: a worker may start
    # it at once (a short delay), and a copy that arrived before its record would be taken
    # for a stale one and dropped.
    store = store_for(task.app)
    key = copy_key(store, request.id, replacement_level(request))
    recorded, previous = False, None
    try:
        options = task.app.conf.broker_transport_options or {}
        visibility = float(options.get("visibility_timeout") or DEFAULT_VISIBILITY_TIMEOUT)
        ttl = int(visibility + max(delay, 0.0) + COPY_MEMORY_MARGIN)
        previous = store.client.set(key, token, ex=ttl, get=True)
        recorded = True
    except redis.RedisError as exc:  # only a crash before the ack could now duplicate it
        logger.warning("celery_reliable: could not record deferred copy of %s: %r", request.id, exc)
    try:
        task.signature_from_request(
            request, args, kwargs, countdown=max(delay, 0.0), headers=headers
        ).apply_async()
    except Exception as exc:
        logger.error(
            "celery_reliable: could not defer %s[%s] (%r); requeueing the message",
            task.name,
            request.id,
            exc,
        )
        if recorded:  # the message requeued now is the task's newest again
            with contextlib.suppress(redis.RedisError):
                if previous is None:
                    store.client.delete(key)
                else:
                    store.client.set(key, previous, keepttl=True)
        raise requeue(f"deferred copy not published: {reason_text(exc)}") from None
    raise Deferred(reason, delay)


def drop_stale_copy(task: ReliableTask) -> None:
    """Drop the running message, an older copy of a task whose newer copy is queued (a
    redelivery after a crash between deferring and acking), leaving a dead letter.

    The entry has reason ``stale_copy`` and its own id (``<task id>-stale-copy``), so it
    never replaces a dead letter of the task itself.

    Raises:
        Deferred: always, after the dead letter was written (the message is then acked).
        Reject: requeue, when the dead letter could not be written.
    """
    request = task.request
    logger.warning(
        "celery_reliable: dropping %s[%s]: an older copy of a deferred task (a newer copy "
        "is queued); dead-lettered as stale_copy",
        task.name,
        request.id,
    )
    exc = StaleCopy(
        f"an older copy of deferred task {request.id}: a newer copy was queued, so this "
        "one was not run"
    )
    entry = task.dead_letter_entry(exc, "stale_copy", None)
    entry.id = f"{request.id}{STALE_COPY_ID_SUFFIX}"
    task.record_dead_letter(entry, exc)
    raise Deferred("stale copy")


def validate_tasks(app: Any) -> None:
    """Check the admission options of every ReliableTask of ``app``.

    Raises:
        ConfigurationError: naming the invalid option and the task.
    """
    for task in list(app.tasks.values()):
        if isinstance(task, ReliableTask):
            admission_of(task)


class AdmissionCheckStep(bootsteps.Step):  # type: ignore[misc]
    """Worker step: a task with an invalid admission option stops the worker at start,
    with one message naming the option and the task."""

    label = "reliable-admission-check"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        validate_tasks(worker.app)


def install(app: Any) -> None:
    """Register the admission extension and the worker step that validates task options.

    Producers validate too, when the app finalizes (Celery logs a failure there instead of
    raising it, so the log names the option and the task).
    """
    add_extension(app, AdmissionExtension(app))
    app.steps["worker"].add(AdmissionCheckStep)
    app.steps["worker"].add(TimerPaceStep)

    def on_finalize(sender: Any = None, **_: Any) -> None:
        validate_tasks(sender if sender is not None else app)

    app.on_after_finalize.connect(on_finalize, weak=False)


def _indexed_hashes(
    app: Any, index: str, key_of: Callable[[RedisStore, str], str], limit: int
) -> dict[str, tuple[dict[str, Any], int]]:
    """The hashes an index names (the ``limit`` used last), read in one pipeline."""
    store = store_for(app)
    client = store.client
    seconds, micros = client.time()
    now = int(seconds) * _US + int(micros)
    names: list[str] = list(client.zrevrange(index, 0, limit - 1))  # type: ignore[arg-type]
    batch = store.pipeline()
    for name in names:
        batch.command("hgetall", key_of(store, name))
    out: dict[str, tuple[dict[str, Any], int]] = {}
    for name, fields in zip(names, batch.execute(), strict=True):
        if fields:  # an expired bucket that has not left the index yet
            out[name] = (dict(fields), now)
    return out


def breakers_status(app: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    store = store_for(app)
    breakers = _indexed_hashes(app, breaker_index_key(store), breaker_key, STATUS_BREAKERS)
    for name, (h, now) in sorted(breakers.items()):
        opened = int(h.get("opened_at") or 0)
        out[name] = {
            "state": h.get("state", "closed"),
            "failures": int(h.get("fails") or 0),
            "opened_at": opened / _US if opened else None,
            "probe": h.get("probe"),
            "probe_lease_left": max(0.0, (int(h["probe_until"]) - now) / _US)
            if h.get("probe_until")
            else None,
        }
    return out


def buckets_status(app: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    store = store_for(app)
    buckets = _indexed_hashes(app, bucket_index_key(store), bucket_key, STATUS_BUCKETS)
    for name, (h, now) in sorted(buckets.items()):
        interval, burst = int(h.get("interval") or 1), int(h.get("burst") or 1)
        tat = int(h.get("tat") or now)
        tokens = (now - (tat - burst * interval)) / interval
        out[name] = {
            "rate_per_s": round(_US / interval, 3),
            "burst": burst,
            "tokens": round(max(0.0, min(float(burst), tokens)), 2),
            "reserved_ahead_s": round(max(0.0, (tat - now) / _US - burst * interval / _US), 3),
        }
    return out
