"""The dead-letter store: failed-for-good tasks, kept in Redis to list, show, replay, purge.

A dead letter is written BEFORE its message is acknowledged, and writes are idempotent by
id (the task id), so a worker killed between the write and the ack leaves exactly one
entry. Capacity is bounded by ``reliable_dead_letter_max`` and ``reliable_dead_letter_ttl``;
entries dropped by either are counted in the store's stats and logged, never silently.

Keys (one ``{dlq}`` hash tag, so every script runs on Redis Cluster too):
``<prefix>:{dlq}:entries`` (HASH id -> JSON), ``<prefix>:{dlq}:index`` (ZSET by failed_at),
``<prefix>:{dlq}:tasks`` (HASH id -> task name), ``<prefix>:{dlq}:stats`` (HASH counters).

Examples:
    >>> dlq = DeadLetterStore(app)
    >>> [e.id for e in dlq.list(task="shop.charge", limit=10)]
    >>> dlq.replay(["4c1f..."])
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from ..core import instruments
from ..core.store import RedisStore, store_for
from ..errors import DeadLetterNotFound, UnknownTaskError
from .record import CORRUPT, MAX_FIELD_CHARS, CorruptEntry, DeadLetter, arguments, bounded
from .scripts import DLQ_ADD, DLQ_REMOVE

logger = logging.getLogger(__name__)

#: Header set on a replayed task: the id of the dead letter it came from.
REPLAYED_FROM_HEADER = "x-reliable-replayed-from"
#: Headers of ours that must not be copied into a replay (it is a new task).
INTERNAL_HEADER_PREFIX = "x-reliable-"
#: Most entries one add may evict (retention work is amortised over adds).
EVICTIONS_PER_ADD = 1000
#: Ids fetched per Redis call while listing or purging.
PAGE_SIZE = 500
#: Ids removed per script call by ``purge --all``/``--task``: 200 ids are 600 commands in
#: one script, well under 20 ms of server time even on a loaded machine (500 took 18 ms).
REMOVE_BATCH = 200
#: Behind Sentinel, seconds a new dead letter waits for one replica to acknowledge it.
REPLICA_WAIT = 0.5
#: Task names read per HSCAN call when a replay checks every selected task is known
#: (5000 per call took up to 82 ms on a loaded 2-core machine at 100,000 entries).
NAMES_PER_SCAN = 500
#: Seconds :meth:`DeadLetterStore.add_patiently` keeps trying when a write fails (Redis
#: restarting, failing over, full, refusing the command) before giving up; a pool process
#: then requeues the message, so a failing store cycles each such task about this often.
WRITE_PATIENCE = 3.0
#: First pause between those attempts, in seconds; it doubles after each attempt.
WRITE_BACKOFF = 0.25
#: Seconds between two log lines about failing dead-letter writes, per process.
WRITE_ERROR_LOG_INTERVAL = WRITE_PATIENCE


class LogThrottle:
    """``due()`` is True at most once per ``interval`` seconds (in this process).

    Examples:
        >>> every = LogThrottle(3.0)
        >>> if every.due(): logger.warning("still failing")
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                return False
            self._last = now
            return True


_write_errors = LogThrottle(WRITE_ERROR_LOG_INTERVAL)


@dataclass(frozen=True)
class Replayed:
    """The outcome of replaying one dead letter.

    Parameters:
      entry_id: the dead letter.
      task: its task name.
      new_task_id: the id of the new task (None when refused).
      sent: whether it was published (False for a dry run and for a refusal).
      refused: why it was not replayed (it stays in the store), or None.
    """

    entry_id: str
    task: str
    new_task_id: str | None
    sent: bool
    refused: str | None = None


class DeadLetterStore:
    """List, show, add, replay and purge dead letters (the CLI is a thin layer over this).

    Parameters:
      app: the Celery app (used to publish replays and check task names).
      store: its Redis store (default: the app's).
    """

    def __init__(self, app: Any, store: RedisStore | None = None) -> None:
        self.app = app
        self.store = store if store is not None else store_for(app)
        self.settings = self.store.settings
        k = self.store.key
        self.entries_key = k("{dlq}", "entries")
        self.index_key = k("{dlq}", "index")
        self.tasks_key = k("{dlq}", "tasks")
        self.stats_key = k("{dlq}", "stats")
        self.kinds_key = k("{dlq}", "kinds")
        self.counts_key = k("{dlq}", "counts")
        #: Longest arguments (as JSON) an entry keeps: what a publish may carry, and at
        #: least what a malformed body keeps; longer ones are cut (see ``bounded``).
        self.arguments_limit = max(self.settings.max_payload_bytes, MAX_FIELD_CHARS)

    # --- writing ---

    def add(self, entry: DeadLetter) -> bool:
        """Store ``entry`` unless its id is already stored. True when it was added.

        Also enforces retention (see :meth:`trim`), in the same script call.
        """
        bounded(entry, self.arguments_limit)
        added = self._add_script(self.add_args(entry))
        if added and self.store.settings.store_address.kind == "sentinel":
            self._wait_for_replica(entry)
        if added:
            instruments.dead_lettered(entry.task, entry.reason)
            logger.error(
                "Dead-lettered %s[%s] (%s): %s: %s",
                entry.task,
                entry.task_id,
                entry.reason,
                entry.exception,
                entry.error,
            )
        return added

    def _wait_for_replica(self, entry: DeadLetter) -> None:
        """Behind Sentinel, wait (briefly) until a replica has the entry: replication is
        asynchronous, and a master that dies right after the write would otherwise take
        the only copy with it while the task's message is acknowledged."""
        replicas = int(self.store.client.wait(1, int(REPLICA_WAIT * 1000)))
        if not replicas:
            logger.warning(
                "dead letter %s is on the master only (no replica acknowledged it within "
                "%.1fs); a failover right now would lose it",
                entry.id,
                REPLICA_WAIT,
            )

    def add_patiently(self, entry: DeadLetter, patience: float = WRITE_PATIENCE) -> bool:
        """:meth:`add`, retried with backoff for ``patience`` seconds when it fails, so a
        Redis restart or failover does not make the caller give up (and rerun the task), and
        a store that keeps failing (full at ``maxmemory``, MOVED, NOPERM...) is not hammered:
        the caller gets the error only after the whole ``patience``. Each failed attempt is
        counted (``store_errors_total{operation="dead_letter"}``); failures are logged at
        most once per :data:`WRITE_ERROR_LOG_INTERVAL` per process. Re-raises the last error.
        """
        deadline = time.monotonic() + patience
        pause = WRITE_BACKOFF
        while True:
            try:
                return self.add(entry)
            except Exception as exc:
                instruments.store_error("dead_letter")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if _write_errors.due():
                    logger.warning(
                        "Dead-letter store unreachable or failing (%r) writing %s[%s]; trying "
                        "again for up to %.1fs (logged once per %.0fs)",
                        exc,
                        entry.task,
                        entry.task_id,
                        left,
                        WRITE_ERROR_LOG_INTERVAL,
                    )
                time.sleep(min(pause, left))
                pause *= 2

    def trim(self) -> None:
        """Drop entries past ``reliable_dead_letter_ttl`` and ``reliable_dead_letter_max``
        now (counted and logged), without adding one. ``list`` and ``stats`` call it, so an
        idle store does not show entries older than its retention."""
        self._add_script(["", "", "0", "", *self.add_args_limits(), "", ""])

    def script_keys(self) -> builtins.list[str]:
        """KEYS of ``dlq_add.lua``."""
        return [
            self.entries_key,
            self.index_key,
            self.tasks_key,
            self.stats_key,
            self.kinds_key,
            self.counts_key,
        ]

    def add_args(self, entry: DeadLetter) -> builtins.list[Any]:
        """ARGV of ``dlq_add.lua`` for ``entry``."""
        return [
            entry.id,
            entry.to_json(),
            repr(entry.failed_at),
            entry.task or "",
            *self.add_args_limits(),
            entry.reason,
            entry.exception or "",
        ]

    def add_args_limits(self) -> builtins.list[Any]:
        """ARGV 5-7 of ``dlq_add.lua``: capacity, retention, evictions per call."""
        return [self.settings.dead_letter_max, self.settings.dead_letter_ttl, EVICTIONS_PER_ADD]

    def _add_script(self, args: builtins.list[Any]) -> bool:
        added, expired, dropped = self.store.run(DLQ_ADD, keys=self.script_keys(), args=args)
        if expired or dropped:
            logger.warning(
                "dead-letter store: %d entries expired (older than reliable_dead_letter_ttl), "
                "%d dropped (over reliable_dead_letter_max=%d)",
                expired,
                dropped,
                self.settings.dead_letter_max,
            )
        return bool(added)

    # --- reading ---

    def count(self) -> int:
        return int(self.store.client.zcard(self.index_key))

    def stats(self) -> dict[str, int]:
        """Counters: ``added``, ``expired``, ``dropped``, and the current ``count``."""
        self.trim()
        raw = self.store.client.hgetall(self.stats_key)
        out = {name: int(raw.get(name, 0)) for name in ("added", "expired", "dropped")}
        out["count"] = self.count()
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Entries stored now ``{"reason": {...}, "exception": {...}}``, from one counts
        hash kept by the add and remove scripts (entries written by versions before it
        existed are not in it)."""
        raw = cast(dict[str, str], self.store.client.hgetall(self.counts_key))
        out: dict[str, dict[str, int]] = {"reason": {}, "exception": {}}
        for name, value in raw.items():
            kind, _, label = name.partition(":")
            if int(value) > 0:
                out["reason" if kind == "r" else "exception"][label] = int(value)
        return out

    def get(self, entry_id: str) -> DeadLetter:
        raw = self.store.client.hget(self.entries_key, entry_id)
        if raw is None:
            raise DeadLetterNotFound(entry_id)
        return _read(entry_id, cast(str, raw))

    def ids(self, task: str | None = None, limit: int | None = None) -> Iterator[str]:
        """Ids, newest first, optionally only of task ``task`` (read :data:`PAGE_SIZE` at a
        time)."""
        client = self.store.client
        start, yielded = 0, 0
        while limit is None or yielded < limit:
            page = cast(
                builtins.list[str], client.zrevrange(self.index_key, start, start + PAGE_SIZE - 1)
            )
            if not page:
                return
            start += len(page)
            if task is not None:
                names = client.hmget(self.tasks_key, page)
                page = [i for i, n in zip(page, names, strict=True) if n == task]
            for entry_id in page:
                yield entry_id
                yielded += 1
                if limit is not None and yielded >= limit:
                    return

    def iter_entries(
        self, task: str | None = None, limit: int | None = None
    ) -> Iterator[DeadLetter]:
        """Dead letters, newest first, read :data:`PAGE_SIZE` at a time (one HMGET of at most
        that many ids per Redis call), so a long listing neither blocks Redis with one
        large reply nor holds every entry in memory."""
        page: builtins.list[str] = []
        for entry_id in self.ids(task=task, limit=limit):
            page.append(entry_id)
            if len(page) >= PAGE_SIZE:
                yield from self._fetch(page)
                page = []
        if page:
            yield from self._fetch(page)

    def _fetch(self, ids: builtins.list[str]) -> builtins.list[DeadLetter]:
        raws = self.store.client.hmget(self.entries_key, ids)
        return [_read(i, cast(str, r)) for i, r in zip(ids, raws, strict=True) if r is not None]

    def list(self, task: str | None = None, limit: int | None = 50) -> builtins.list[DeadLetter]:
        """Dead letters, newest first (after applying retention, see :meth:`trim`)."""
        self.trim()
        return builtins.list(self.iter_entries(task=task, limit=limit))

    def task_names(self) -> set[str]:
        """Names of the tasks that have dead letters (read with HSCAN, a page at a time)."""
        client: Any = self.store.client
        pages = client.hscan_iter(self.tasks_key, count=NAMES_PER_SCAN)
        return {str(name) for _, name in pages}

    def id_batches(
        self, task: str | None = None, size: int = PAGE_SIZE
    ) -> Iterator[builtins.list[str]]:
        """The ids stored when the call starts (only ``task``'s, if given), oldest first,
        ``size`` at a time, for a caller that removes what it handled (replay, purge).

        Only entries that failed no later than the newest entry at the start are read, so
        a replayed task that fails again at once is not replayed again in the same run.
        Entries the caller leaves in place (a dry run) are stepped over, never read twice.
        """
        client: Any = self.store.client
        newest = client.zrevrange(self.index_key, 0, 0, withscores=True)
        if not newest:
            return
        until, offset = newest[0][1], 0
        while True:
            page = cast(
                builtins.list[str],
                client.zrangebyscore(self.index_key, "-inf", until, start=offset, num=size),
            )
            if not page:
                return
            if task is not None:
                names = client.hmget(self.tasks_key, page)
                kept = [i for i, n in zip(page, names, strict=True) if n == task]
                offset += len(page) - len(kept)
                page = kept
            if page:
                yield page
                left = client.zmscore(self.index_key, page)
                offset += sum(1 for score in left if score is not None)

    # --- removing ---

    def remove(self, ids: Iterable[str]) -> int:
        """Delete entries by id; returns how many existed."""
        removed = 0
        batch: builtins.list[str] = []
        for entry_id in ids:
            batch.append(entry_id)
            if len(batch) >= REMOVE_BATCH:
                removed += self._remove_batch(batch)
                batch = []
        if batch:
            removed += self._remove_batch(batch)
        return removed

    def _remove_batch(self, ids: builtins.list[str]) -> int:
        return int(
            self.store.run(
                DLQ_REMOVE,
                keys=[
                    self.entries_key,
                    self.index_key,
                    self.tasks_key,
                    self.kinds_key,
                    self.counts_key,
                ],
                args=ids,
            )
        )

    def purge(
        self,
        ids: Iterable[str] = (),
        *,
        all: bool = False,
        task: str | None = None,
        progress: Callable[[int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Delete the given ids, every entry (``all``), or every entry of ``task``.

        ``all`` and ``task`` delete :data:`REMOVE_BATCH` entries per Redis call, oldest first,
        calling ``progress(removed so far)`` after each batch and ending early when
        ``stop()`` answers True.
        """
        if not all and task is None:
            return self.remove(ids)
        removed = 0
        for batch in self.id_batches(task=task, size=REMOVE_BATCH):
            if stop is not None and stop():
                break
            removed += self._remove_batch(batch)
            if progress is not None:
                progress(removed)
        return removed

    # --- replaying ---

    def select(
        self, ids: Iterable[str] = (), *, all: bool = False, task: str | None = None
    ) -> builtins.list[str]:
        """The ids a replay or purge with these arguments would touch."""
        if all:
            return list(self.ids())
        if task is not None:
            return list(self.ids(task=task))
        return list(dict.fromkeys(ids))  # an id given twice is replayed once

    def replay(
        self,
        ids: Iterable[str] = (),
        *,
        all: bool = False,
        task: str | None = None,
        dry_run: bool = False,
    ) -> builtins.list[Replayed]:
        """Re-publish entries as new tasks, then remove each one whose publish succeeded.

        The new task has the same name, arguments, custom headers and route, a new id and
        the header ``x-reliable-replayed-from: <entry id>``. A ``malformed`` entry is
        replayed with the arguments of its original body. Entries that cannot be replayed
        faithfully are refused and kept (``Replayed.refused`` says why): a task this app
        does not know, arguments that were cut, a body that is not a task body, a corrupt
        entry. The others are replayed all the same. :meth:`replay_iter` does the same one
        entry at a time.

        Raises:
            DeadLetterNotFound: an explicit id is not in the store (nothing is sent).
        """
        return builtins.list(self.replay_iter(ids, all=all, task=task, dry_run=dry_run))

    def replay_iter(
        self,
        ids: Iterable[str] = (),
        *,
        all: bool = False,
        task: str | None = None,
        dry_run: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[Replayed]:
        """:meth:`replay`, streamed: entries are read :data:`PAGE_SIZE` at a time, oldest
        first, and each is removed right after its own publish, so an interrupted run
        leaves exactly the entries it did not replay; running it again continues without
        replaying any entry twice. ``stop()`` is asked between two entries (the CLI's
        Ctrl-C); when it answers True the run ends there.

        Entries that cannot be replayed are yielded with ``refused`` set, and kept.

        Raises:
            DeadLetterNotFound: an explicit id is not in the store (nothing was sent).
        """
        self.app.loader.import_default_modules()
        batches: Iterable[builtins.list[DeadLetter]]
        if all or task is not None:
            batches = (self._fetch(page) for page in self.id_batches(task=task))
        else:
            batches = [[self.get(i) for i in dict.fromkeys(ids)]]
        for batch in batches:
            for entry in batch:
                if stop is not None and stop():
                    return
                found = self._replayable(entry)
                if isinstance(found, str):
                    yield Replayed(entry.id, entry.task or "", None, False, found)
                    continue
                new_id = str(uuid.uuid4())
                if not dry_run:
                    self._publish(entry, new_id, *found)
                    self._remove_batch([entry.id])
                yield Replayed(entry.id, entry.task or "", new_id, not dry_run)

    def _replayable(self, entry: DeadLetter) -> tuple[builtins.list[Any], dict[str, Any]] | str:
        """The arguments to replay ``entry`` with, or why it cannot be replayed."""
        if entry.reason == CORRUPT:
            return entry.error or "corrupt entry"
        if not entry.task or entry.task not in self.app.tasks:
            return str(UnknownTaskError(entry.task or "<none>"))
        if "args" in entry.truncated:
            return (
                "its arguments were too large to keep (cut when it was dead-lettered); "
                "replay it by hand from the body shown by dlq show, or purge it"
            )
        if entry.reason != "malformed":
            return entry.args, entry.kwargs
        found = None
        if entry.body is not None and "body" not in entry.truncated:
            try:
                found = arguments(json.loads(entry.body))
            except ValueError:
                found = None
        if found is None:
            return (
                "malformed message whose body is not a whole task body [args, kwargs, embed]; "
                "nothing to replay it with (inspect it with dlq show, then purge it)"
            )
        return found

    def _publish(
        self, entry: DeadLetter, new_id: str, args: builtins.list[Any], kwargs: dict[str, Any]
    ) -> None:
        headers = {
            k: v
            for k, v in (entry.headers or {}).items()
            if not k.startswith(INTERNAL_HEADER_PREFIX)
        }
        headers[REPLAYED_FROM_HEADER] = entry.id
        options: dict[str, Any] = {"task_id": new_id, "headers": headers}
        if entry.routing_key is not None:
            options["routing_key"] = entry.routing_key
            if entry.exchange is not None:
                options["exchange"] = entry.exchange
        elif entry.queue:
            options["queue"] = entry.queue
        if entry.priority is not None:
            options["priority"] = entry.priority
        self.app.send_task(entry.task, args=args, kwargs=kwargs, **options)
        logger.info("Replayed dead letter %s as %s[%s]", entry.id, entry.task, new_id)


def _read(entry_id: str, raw: str) -> DeadLetter:
    """A stored entry, or its ``corrupt`` stand-in when it cannot be read."""
    try:
        return DeadLetter.from_json(raw)
    except CorruptEntry as exc:
        logger.warning("dead letter %s is corrupt: %s", entry_id, exc)
        return DeadLetter.corrupt(entry_id, raw, str(exc))
