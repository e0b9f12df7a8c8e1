"""Operations that stay flat with the size of the store: ``dlq list`` reads at most 500 ids
per Redis call, ``replay`` and ``purge`` stream in batches (and an interrupted replay run
again replays nothing twice), ``status`` reads the package's indexes and never SCANs, and
every CLI command turns a Redis error into one line and exit code 1. (The timings at
100,000 dead letters are bench/flat_ops.py; these tests prove the shapes.)"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.core.store import RedisStore, store_for
from celery_reliable.deadletters.scripts import DLQ_ADD
from celery_reliable.deadletters.store import PAGE_SIZE
from celery_reliable.status import collect
from celery_reliable.testing import free_port
from tests.apps import basic
from tests.conftest import Namespace
from tests.test_dlq_cli import celery


class Recording(redis.Redis):
    """A real client that remembers every command it sent (name, argument count)."""

    calls: list[tuple[str, int]]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.calls.append((str(args[0]).upper(), len(args) - 1))
        return super().execute_command(*args, **options)


def recording_store(app: Any) -> tuple[DeadLetterStore, Recording]:
    client = Recording.from_url(app.conf.reliable_redis_url, decode_responses=True)
    client.calls = []
    store = RedisStore(store_for(app).settings, client=client)
    return DeadLetterStore(app, store=store), client


def fill(app: Any, n: int, task: str = "basic.permanent") -> list[str]:
    """Add ``n`` dead letters in pipelined script calls; their ids, oldest first."""
    store = DeadLetterStore(app)
    ids = [f"e{i:05d}" for i in range(n)]
    start = time.time() - n
    for first in range(0, n, 1000):
        batch = store.store.pipeline()
        for i in range(first, min(n, first + 1000)):
            entry = DeadLetter(id=ids[i], task_id=ids[i], task=task, args=[i], failed_at=start + i)
            batch.run(DLQ_ADD, store.script_keys(), store.add_args(entry))
        batch.execute()
    return ids


def test_list_reads_at_most_500_ids_per_call(ns: Namespace) -> None:
    app = ns.app(basic.build)
    ids = fill(app, 1_234)
    dlq, client = recording_store(app)
    listed = [e.id for e in dlq.iter_entries(limit=None)]
    assert listed == ids[::-1]
    widest = max(n for name, n in client.calls if name in ("HMGET", "ZREVRANGE"))
    assert widest <= PAGE_SIZE + 1, client.calls  # HMGET key + ids
    hmgets = [n - 1 for name, n in client.calls if name == "HMGET"]
    assert hmgets == [500, 500, 234]


def test_interrupted_replay_run_again_replays_each_entry_exactly_once(ns: Namespace) -> None:
    app = ns.app(basic.build)
    ids = fill(app, 1_100, task="basic.ok")
    sent: list[str] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        if len(sent) == 700:
            raise OSError("the broker went away")
        sent.append(options["headers"]["x-reliable-replayed-from"])

    app.send_task = send_task  # type: ignore[method-assign]
    dlq = DeadLetterStore(app)
    with pytest.raises(OSError):
        for _ in dlq.replay_iter(all=True):
            pass
    assert sent == ids[:700], "oldest first, each removed right after its publish"
    assert dlq.count() == 400
    sent.append("<rerun>")
    stops = iter([False] * 150 + [True])
    partial = list(dlq.replay_iter(all=True, stop=lambda: next(stops)))
    assert len(partial) == 150 and dlq.count() == 250
    rest = list(dlq.replay_iter(all=True))
    assert len(rest) == 250 and dlq.count() == 0
    replayed = [i for i in sent if i != "<rerun>"]
    assert replayed == ids and len(set(replayed)) == len(ids)


def test_status_reads_indexes_and_never_scans(ns: Namespace) -> None:
    app = ns.app(basic.build)
    fill(app, 50)
    client = redis.Redis.from_url(ns.redis_url)
    client.mset({f"unrelated:{i}": i for i in range(5_000)})
    client.config_resetstat()
    report = collect(app)
    stats = client.info("commandstats")
    assert "cmdstat_scan" not in stats, sorted(stats)
    assert report["dead_letters"]["count"] == 50
    assert {"workers", "orphans", "breakers", "buckets", "ordering", "dead_letters"} <= set(report)


def test_replay_and_purge_all_report_each_batch_and_a_summary(ns: Namespace) -> None:
    app = ns.app(basic.build)
    fill(app, 1_200, task="basic.ok")
    replay = celery(ns, "reliable", "dlq", "replay", "--task", "basic.ok", "--dry-run")
    assert replay.returncode == 0, replay.stderr
    assert replay.stderr.splitlines() == ["would replay 500", "would replay 1000"]
    assert replay.stdout.strip() == "1200 would replay; 1200 dead letters left in the store"
    purge = celery(ns, "reliable", "dlq", "purge", "--all", "--yes")
    assert purge.returncode == 0, purge.stderr
    assert purge.stderr.splitlines() == [
        "purged 600 of 1200",  # 200 per script call; a line each time 500 more are gone
        "purged 1000 of 1200",
        "purged 1200 of 1200",
    ]
    assert purge.stdout.strip() == "purged 1200"
    assert DeadLetterStore(app).count() == 0


@pytest.mark.parametrize(
    "command",
    [
        ("reliable", "status"),
        ("reliable", "dlq", "list"),
        ("reliable", "dlq", "replay", "--all"),
        ("reliable", "dlq", "purge", "--all", "--yes"),
        ("reliable-reaper", "--once"),
    ],
)
def test_every_command_turns_a_redis_error_into_one_line(ns: Namespace, command) -> None:
    down = f"redis://:secret@127.0.0.1:{free_port()}/1"
    done = celery(ns, *command, CR_REDIS_URL=down)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "at redis://:**@127.0.0.1:" in line and "Connection refused" in line
