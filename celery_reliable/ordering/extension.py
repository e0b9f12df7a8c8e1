"""Per-key ordering: tasks that share a group and a key run one at a time, in publish order.

How it works (details, costs and failure modes in docs/ordering.md):

- **Publish** (producer, one round trip): the app's ``send_task`` (which ``apply_async``,
  ``delay``, retries and ``send_task`` by name all go through) takes the next sequence
  number of the task's ``(ordering_group, key)`` with ``ord_publish.lua`` and puts
  ``[group, key, seq, task_id]`` in the ``x-reliable-order`` header. An error reaches the
  caller and nothing is sent. A retry or re-publish of the same task id keeps its place.
- **Start** (pool child, one round trip): ``ord_start.lua`` either grants the key (a
  fencing token and a lease) or parks the task's signature in Redis atomically with the
  check; the message is then acknowledged (:class:`~celery_reliable.core.extensions.Deferred`)
  and no pool slot, sleep or poll is spent waiting.
- **End** (pool child, one round trip): ``ord_end.lua`` advances the key (or keeps the turn
  for a retry) and returns the parked task whose turn it now is; this process re-publishes
  it at once. The lease is renewed by a thread while a long task runs (fenced).
- **Revoked/expired** tasks never reach the body; the worker's ``task_revoked`` signal
  cancels their place (:mod:`celery_reliable.ordering.sweep`), and a periodic sweep in each
  worker redoes lost hand-offs and skips sequence numbers that never arrived.

Examples:
    >>> @app.task(base=ReliableTask, bind=True, ordering_key="account_id")
    ... def apply_event(self, account_id, event): ...
    >>> @app.task(base=ReliableTask, ordering_key=lambda order, **kw: order["id"],
    ...           ordering_group="orders")
    ... def ship(order): ...
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import Ignore, Reject, Retry
from celery.utils import uuid
from celery.utils.time import maybe_iso8601
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from ..core import instruments
from ..core.chain import ScriptCall
from ..core.extensions import ORDER_ORDERING, Deferred, Outcome
from ..core.state import settings_of
from ..core.store import RedisStore, store_for
from ..errors import ConfigurationError
from ..task import reason_text, requeue
from .scripts import ORD_END, ORD_INDEX, ORD_PUBLISH, ORD_RENEW, ORD_START

logger = logging.getLogger(__name__)

#: Message header carrying a task's place: ``[group, key, seq, task_id]``.
HEADER = "x-reliable-order"
#: Lifetime of a key's state in Redis after its last use: 7 days, in ms.
STATE_TTL_MS = 7 * 24 * 3600 * 1000
#: ``celery reliable status`` reads the parked counts of this many keys at most (the ones
#: active most recently), so it stays fast with any number of ordering keys.
STATUS_KEYS = 1000
#: Counters of rare events (skips, duplicates...), shown by ``celery reliable status``.
STATS_FIELDS = ("skipped", "duplicates", "cancelled", "republished", "unsequenced", "fenced")

_SPEC_ATTR = "_reliable_ordering_spec"
_POSITIONAL = ("name", "args", "kwargs")


@dataclass(frozen=True)
class Place:
    """Where one published task stands in its key's line."""

    group: str
    key: str
    seq: int
    task_id: str

    def header(self) -> list[Any]:
        return [self.group, self.key, self.seq, self.task_id]

    @classmethod
    def from_header(cls, value: Any) -> Place | None:
        """Parse the ``x-reliable-order`` header; None when absent or malformed."""
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            return None
        group, key, seq, task_id = value
        try:
            return cls(str(group), str(key), int(seq), str(task_id))
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class OrderingSpec:
    """A task's validated ordering options."""

    group: str
    key_of: Callable[[tuple[Any, ...], dict[str, Any]], str | None]


def ordering_spec(task: Any) -> OrderingSpec | None:
    """The ordering options of ``task`` (None when unordered), validated once per class.

    Raises:
        ConfigurationError: ``ordering_key`` or ``ordering_group`` is invalid; the message
            names the option and the task.
    """
    cls = type(task)
    cached = cls.__dict__.get(_SPEC_ATTR)
    if cached is not None:
        return cached or None
    spec = _build_spec(task)
    setattr(cls, _SPEC_ATTR, spec or False)
    return spec


def _build_spec(task: Any) -> OrderingSpec | None:
    # A function set as a class attribute would bind as a method: read it unbound.
    option = inspect.getattr_static(task, "ordering_key", None)
    if isinstance(option, (staticmethod, classmethod)):
        option = option.__func__
    group = getattr(task, "ordering_group", None)
    name = getattr(task, "name", None) or type(task).__name__
    if option is None:
        if group is not None:
            raise ConfigurationError(
                "ordering_group", f"task {name!r} sets ordering_group but no ordering_key"
            )
        return None
    if group is None:
        group = name
    if not isinstance(group, str) or not group:
        raise ConfigurationError(
            "ordering_group", f"task {name!r}: expected a non-empty string, got {group!r}"
        )
    if callable(option):
        fn = option

        def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
            value = fn(*args, **kwargs)
            return key_text(value)

        return OrderingSpec(group, key_of)
    if not isinstance(option, str) or not option:
        raise ConfigurationError(
            "ordering_key",
            f"task {name!r}: expected a parameter name or a callable, got {option!r}",
        )
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):  # pragma: no cover (builtins)
        signature = None
    if signature is not None:
        params = signature.parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if option not in params and not var_kw:
            raise ConfigurationError(
                "ordering_key",
                f"task {name!r} has no parameter {option!r} (parameters: {', '.join(params)})",
            )
    param = option

    def key_of_param(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if param in kwargs:
            value = kwargs[param]
        elif signature is None:
            return None
        else:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"task {name!r}: cannot read ordering_key {param!r}: {exc}"
                ) from exc
            bound.apply_defaults()
            value = bound.arguments.get(param)
        return key_text(value)

    return OrderingSpec(group, key_of_param)


def validate_tasks(app: Any) -> None:
    """Validate the ordering options of every task of ``app`` (at worker start)."""
    for task in list(app.tasks.values()):
        if getattr(task, "ordering_key", None) is not None or getattr(task, "ordering_group", None):
            ordering_spec(task)


# --- Redis keys ---


def key_names(store: RedisStore, group: str, key: str) -> list[str]:
    """``[state, parked]`` of one ordering key; both share one hash tag (one slot).

    The group is length-prefixed (``{ord:<len>:<group>:<key>}``), so distinct
    ``(group, key)`` pairs never share a line: group ``x`` with key ``a:b`` and group
    ``x:a`` with key ``b`` are ``{ord:1:x:a:b}`` and ``{ord:3:x:a:b}``.
    """
    tag = "{ord:" + str(len(group)) + ":" + group + ":" + key + "}"
    return [store.key(tag, "state"), store.key(tag, "parked")]


def key_text(value: Any) -> str | None:
    """The text an ordering key value is compared by (None: the task is not ordered).

    Strings are themselves; lists and objects are their JSON with sorted keys, so equal
    values are one key whatever their order; anything else is ``str(value)``, so ``5``
    and ``"5"`` are the same key (an id that one producer sends as a number and another
    as a string still orders one account).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def index_key(store: RedisStore) -> str:
    """Sorted set of ordering keys to sweep (member: JSON ``[group, key]``)."""
    return store.key("{ord}", "keys")


def stats_key(store: RedisStore) -> str:
    return store.key("{ord}", "stats")


def count(store: RedisStore, field: str, n: int = 1) -> None:
    """Add to one of :data:`STATS_FIELDS` (rare events only; errors are logged)."""
    try:
        store.client.hincrby(stats_key(store), field, n)
    except redis.RedisError as exc:
        logger.warning("ordering: could not count %s: %r", field, exc)


# --- publish ---


def assign_sequence(
    app: Any, task: Any, args: Any, kwargs: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """Give an ordered publish its place; returns the options to publish with.

    One round trip (``ord_publish.lua``). A publish that already carries a place for the
    same task id (a retry, a hand-off re-publish) keeps it. Call it and not publish, and
    the key waits ``reliable_ordering_gap_timeout`` for the missing number, then skips it.

    Raises:
        redis.RedisError: the place could not be taken; the caller should not publish.
    """
    spec = ordering_spec(task)
    if spec is None:
        return options
    key = spec.key_of(tuple(args or ()), dict(kwargs or {}))
    if key is None:
        return options
    headers = dict(options.get("headers") or {})
    task_id = options.get("task_id") or uuid()
    current = Place.from_header(headers.get(HEADER))
    if current is not None and current.task_id == task_id:
        return options
    store = store_for(app)
    delay_ms = int(due_in(options) * 1000)
    seq = store.run(ORD_PUBLISH, key_names(store, spec.group, key)[:1], [STATE_TTL_MS, delay_ms])
    headers[HEADER] = Place(spec.group, key, int(seq), task_id).header()
    return {**options, "task_id": task_id, "headers": headers}


def due_in(options: dict[str, Any]) -> float:
    """Seconds until a publish with ``countdown``/``eta`` is due (0 when it is not delayed)."""
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)) and countdown > 0:
        return float(countdown)
    eta = options.get("eta")
    if isinstance(eta, str):
        eta = maybe_iso8601(eta)
    if eta is not None and hasattr(eta, "timestamp"):
        return max(0.0, eta.timestamp() - time.time())
    return 0.0


def wrap_send_task(app: Any) -> None:
    """Make ``app.send_task`` assign places to ordered tasks (``apply_async`` calls it)."""
    original = app.send_task
    if getattr(original, "_reliable_ordering", False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def send_task(
        name: str, args: Any = None, kwargs: Any = None, *more: Any, **options: Any
    ) -> Any:
        task = app.tasks.get(name)
        if task is None or getattr(task, "ordering_key", None) is None:
            return original(name, args, kwargs, *more, **options)
        if more:  # options given by position (countdown, eta, task_id...): name them
            bound = signature.bind(name, args, kwargs, *more, **options)
            options = {k: v for k, v in bound.arguments.items() if k not in _POSITIONAL}
            options.update(options.pop("options", {}))
        options = assign_sequence(app, task, args, kwargs, options)
        return original(name, args, kwargs, **options)

    send_task._reliable_ordering = True  # type: ignore[attr-defined]
    app.send_task = send_task


def republish(app: Any, payload: str) -> str:
    """Publish a parked task again, exactly as it was (same id, headers and place).

    Returns the task id.
    """
    data = json_loads(payload)
    sig = app.signature(data)
    sig.apply_async()
    return str(data.get("options", {}).get("task_id"))


def signature_payload(task: Any) -> str:
    """The JSON needed to re-publish the running request as it is."""
    sig = task.signature_from_request(task.request)
    return str(json_dumps(dict(sig)))


# --- lease renewal in the pool process ---


class LeaseKeeper:
    """A daemon thread (one per process) renewing the leases of keys held by running tasks.

    A holder's lease is ``reliable_worker_timeout``; it is renewed every
    ``reliable_heartbeat_interval`` once the task ran that long, so short tasks cost nothing.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._held: dict[int, tuple[str, int, float]] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._wake = threading.Event()

    def hold(self, state_key: str, token: int) -> None:
        with self._lock:
            self._held[token] = (state_key, token, time.monotonic())
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(
                    target=self._run, name="reliable-ordering-lease", daemon=True
                ).start()

    def release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)

    def _run(self) -> None:
        settings = settings_of(self.app)
        interval = settings.heartbeat_interval
        lease_ms = int(settings.worker_timeout * 1000)
        store = store_for(self.app)
        while True:
            self._wake.wait(interval)
            now = time.monotonic()
            with self._lock:
                due = [h for h in self._held.values() if now - h[2] >= interval]
            for state_key, token, _ in due:
                try:
                    if not store.run(ORD_RENEW, [state_key], [token, lease_ms]):
                        logger.error(
                            "ordering: lease of %s was taken over (token %s); this run "
                            "will not advance the key",
                            state_key,
                            token,
                        )
                        self.release(token)
                except redis.RedisError as exc:
                    logger.warning("ordering: could not renew lease of %s: %r", state_key, exc)


# --- the task extension ---


@dataclass
class _Held:
    place: Place
    keys: list[str]
    token: int


class OrderingExtension:
    """Grants the key at start (or parks the task), advances it at the end."""

    name = "ordering"
    order = ORDER_ORDERING

    def __init__(self, app: Any) -> None:
        self.app = app
        self.leases = LeaseKeeper(app)
        self._held: dict[str, _Held] = {}
        self._warned: set[str] = set()

    def applies(self, task: Any) -> bool:
        return ordering_spec(task) is not None

    def start_calls(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Sequence[ScriptCall]:
        request = task.request
        place = Place.from_header((request.headers or {}).get(HEADER))
        if place is None:
            return ()
        store = store_for(self.app)
        settings = settings_of(self.app)
        keys = key_names(store, place.group, place.key)
        member = json.dumps([place.group, place.key])
        request._reliable_place = (place, keys)
        return (
            ScriptCall(ORD_INDEX, [index_key(store)], [member, int(time.time() * 1000)]),
            ScriptCall(
                ORD_START,
                keys,
                [
                    place.seq,
                    int(settings.worker_timeout * 1000),
                    signature_payload(task),
                    STATE_TTL_MS,
                ],
                gate=True,
            ),
        )

    def started(
        self,
        task: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        replies: Sequence[Any],
    ) -> None:
        request = task.request
        if not replies:
            self._unsequenced(task)
            return
        place, keys = request._reliable_place
        reply = replies[-1]
        if isinstance(reply, Exception):  # the store error that stopped the phase
            instruments.store_error("ordering")
            logger.error(
                "ordering: cannot reach Redis to start %s[%s] (%r); requeueing it",
                task.name,
                request.id,
                reply,
            )
            raise requeue(f"ordering start failed: {reason_text(reply)}") from None
        verdict = reply[0]
        if verdict == "run":
            token = int(reply[1])
            self._held[request.id] = _Held(place, keys, token)
            self.leases.hold(keys[0], token)
            return
        if verdict == "park":
            raise Deferred(f"ordering: {place.key!r} #{place.seq} waits for its turn")
        # stale: its turn has passed
        if int(reply[1]):
            self._skipped_arrival(task, place)
        count(store_for(self.app), "duplicates")
        logger.info(
            "ordering: %s[%s] (%s #%s) already ran; dropping the duplicate delivery",
            task.name,
            request.id,
            place.key,
            place.seq,
        )
        raise Ignore()

    def end_calls(self, task: Any, outcome: Outcome) -> Sequence[ScriptCall]:
        held = self._held.get(task.request.id)
        if held is None:
            return ()
        again, wait_s = end_mode(outcome)
        gap = settings_of(self.app).ordering_gap_timeout
        return (
            ScriptCall(
                ORD_END,
                held.keys,
                [
                    held.place.seq,
                    held.token,
                    "again" if again else "done",
                    int((wait_s + gap) * 1000),
                ],
            ),
        )

    def ended(self, task: Any, outcome: Outcome, replies: Sequence[Any]) -> None:
        held = self._held.pop(task.request.id, None)
        if held is None:
            return
        self.leases.release(held.token)
        (reply,) = replies
        if isinstance(reply, Exception):  # the store error that stopped the phase
            logger.error(
                "ordering: could not end %s[%s] (key %r #%s): %r",
                task.name,
                task.request.id,
                held.place.key,
                held.place.seq,
                reply,
            )
            return
        if reply[0] == "fenced":
            count(store_for(self.app), "fenced")
            logger.error(
                "ordering: %s[%s] lost key %r #%s to a newer holder (its lease expired); "
                "it did not advance the key",
                task.name,
                task.request.id,
                held.place.key,
                held.place.seq,
            )
        elif reply[0] == "next":
            republish(self.app, reply[1])

    def _unsequenced(self, task: Any) -> None:
        count(store_for(self.app), "unsequenced")
        if task.name not in self._warned:
            self._warned.add(task.name)
            logger.warning(
                "ordering: %s[%s] arrived without a place (published by a process where "
                "the task is not registered, or before celery_reliable.install); it runs "
                "unordered",
                task.name,
                task.request.id,
            )

    def _skipped_arrival(self, task: Any, place: Place) -> None:
        """A task arrived after its place was skipped (gap timeout): dead-letter it, so it
        is neither lost nor run out of order."""
        exc = RuntimeError(
            f"arrived after reliable_ordering_gap_timeout skipped its place "
            f"({place.group!r}, {place.key!r}, #{place.seq})"
        )
        task.record_dead_letter(task.dead_letter_entry(exc, "ordering_skipped", None), exc)
        logger.error("ordering: %s[%s] %s; dead-lettered", task.name, task.request.id, exc)
        raise Ignore()


def end_mode(outcome: Outcome) -> tuple[bool, float]:
    """``(again, seconds)``: whether the same task comes back (keep its turn), and when."""
    exc = outcome.exc
    if outcome.kind == "retry":
        return True, _retry_delay(exc)
    if outcome.kind == "deferred":  # a later extension sent it back with a delay
        return True, float(getattr(exc, "delay", None) or 0.0)
    if outcome.kind == "ignored":
        if isinstance(exc, Reject):
            return bool(exc.requeue), 0.0
        if isinstance(exc, Ignore):
            return False, 0.0
        return True, 0.0  # requeued (dead letter not written) or the process is exiting
    return False, 0.0


def _retry_delay(exc: BaseException | None) -> float:
    when = getattr(exc, "when", None) if isinstance(exc, Retry) else None
    if isinstance(when, (int, float)):
        return float(when)
    if when is not None and hasattr(when, "timestamp"):
        return max(0.0, when.timestamp() - time.time())
    return 0.0


# --- status ---


def status(app: Any) -> dict[str, Any]:
    """Ordered keys known to the sweep, parked tasks, and counters of rare events.

    Reads the sweep's index only: its size, and the parked counts of the
    :data:`STATUS_KEYS` keys active most recently (``keys_examined``), so the cost does not
    grow with the number of keys.
    """
    store = store_for(app)
    client = store.client
    index = index_key(store)
    total = int(client.zcard(index))
    members: list[str] = list(client.zrevrange(index, 0, STATUS_KEYS - 1))  # type: ignore[arg-type]
    batch = store.pipeline()
    for member in members:
        group, key = json.loads(member)
        batch.command("hlen", key_names(store, group, key)[1])
    parked = [int(n) for n in batch.execute()]
    stats = client.hgetall(stats_key(store))
    return {
        "keys": total,
        "keys_examined": len(members),
        "keys_with_parked": sum(1 for n in parked if n),
        "parked": sum(parked),
        **{f: int(stats.get(f, 0)) for f in STATS_FIELDS},
    }
