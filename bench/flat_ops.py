"""Operations on a large store: ``status``, ``dlq list``, ``dlq replay --all`` and
``dlq purge --all`` with 100,000 dead letters and 200,000 unrelated keys in the same db.

Each command runs as a real ``celery -A bench.app reliable ...`` subprocess against a
private redis-server that is also the broker (the store shares the broker's db, the
default). Reported per command: wall time, the process's peak RSS, the longest single
Redis call (SLOWLOG, every call over 0.1 ms is logged), and for ``replay`` the time until
its first task is on the queue. The CLI's own start-up (``reliable --help``) is the
baseline.

Run: ``.venv/bin/python -m bench.flat_ops [--entries 100000] [--unrelated 200000]``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import redis

from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.core.config import Settings
from celery_reliable.core.store import RedisStore
from celery_reliable.deadletters.scripts import DLQ_ADD
from celery_reliable.testing import RedisServer

#: SLOWLOG records every call slower than this many microseconds.
SLOWLOG_THRESHOLD_US = 100
#: ... and keeps this many of them.
SLOWLOG_LENGTH = 100_000
#: Dead letters written per pipelined batch while filling the store.
FILL_BATCH = 1000
PREFIX = "bench"
TASK = "bench.reliable"
QUEUE = "celery"


def fill(store: RedisStore, entries: int) -> None:
    dlq = DeadLetterStore(None, store=store)
    tb = "Traceback (most recent call last):\n" + "  File 'x.py', line 1, in f\n" * 20
    start = time.time() - entries
    for first in range(0, entries, FILL_BATCH):
        batch = store.pipeline()
        for i in range(first, min(entries, first + FILL_BATCH)):
            entry = DeadLetter(
                id=f"id-{i}",
                task_id=f"id-{i}",
                task=TASK,
                args=[i],
                exception="ValueError",
                error="bad input",
                traceback=tb,
                failed_at=start + i,
            )
            batch.run(DLQ_ADD, dlq.script_keys(), dlq.add_args(entry))
        batch.execute()


def run(
    env: dict[str, str],
    client: redis.Redis,
    queue_key: str,
    *args: str,
    interrupt_after: int | None = None,
) -> dict[str, Any]:
    """Run one CLI command; its time, peak RSS, longest Redis call and first publish.

    With ``interrupt_after``, Ctrl-C (SIGINT) is sent once that many tasks are queued.
    """
    client.slowlog_reset()
    first: list[float] = []
    stop = threading.Event()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.app", "reliable", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def watch() -> None:
        watcher = redis.Redis(connection_pool=client.connection_pool)
        while not stop.is_set():
            queued = watcher.llen(queue_key)
            if queued and not first:
                first.append(time.perf_counter() - started)
                if interrupt_after is None:
                    return
            if interrupt_after is not None and queued >= interrupt_after:
                proc.send_signal(signal.SIGINT)
                return
            stop.wait(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0 and interrupt_after is None:
        raise RuntimeError(f"{args} failed: {err[-2000:]}")
    # the command's calls only: not this script's own SLOWLOG and LLEN polling
    slow = [
        e
        for e in client.slowlog_get(SLOWLOG_LENGTH)
        if not e["command"].upper().startswith((b"SLOWLOG", b"LLEN"))
    ]
    longest = max(slow, key=lambda e: e["duration"], default=None)
    return {
        "command": " ".join(args),
        "seconds": elapsed,
        "rss_mb": usage.ru_maxrss / 1024,
        "longest_ms": longest["duration"] / 1000 if longest else None,
        "longest_call": (longest["command"][:60].decode(errors="replace") if longest else ""),
        "first_publish_s": first[0] if first else None,
        "queued": client.llen(queue_key),
        "last_line": err.strip().splitlines()[-1] if err.strip() else "",
    }


def show(row: dict[str, Any]) -> None:
    longest = (
        f"{row['longest_ms']:.2f} ms ({row['longest_call']})"
        if row["longest_ms"] is not None
        else f"< {SLOWLOG_THRESHOLD_US / 1000} ms"
    )
    first = (
        f", first task queued after {row['first_publish_s']:.2f} s"
        if row["first_publish_s"]
        else ""
    )
    print(
        f"{row['command']:<34} {row['seconds']:7.2f} s  peak RSS {row['rss_mb']:6.1f} MB  "
        f"longest Redis call {longest}{first}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--unrelated", type=int, default=200_000)
    parser.add_argument(
        "--replay-interrupt",
        type=int,
        default=None,
        metavar="N",
        help="send Ctrl-C to replay --all once N tasks are queued, then replay the rest",
    )
    opts = parser.parse_args()
    server = RedisServer(args=["--enable-debug-command", "local"]).start()
    try:
        url = server.url(0)
        client = redis.Redis.from_url(url)
        client.config_set("slowlog-log-slower-than", SLOWLOG_THRESHOLD_US)
        client.config_set("slowlog-max-len", SLOWLOG_LENGTH)
        client.execute_command("DEBUG", "POPULATE", opts.unrelated, "unrelated")
        store = RedisStore(Settings(redis_url=url, key_prefix=PREFIX, dead_letter_max=10**6))
        env = {
            **os.environ,
            "BENCH_BROKER_URL": url,
            "BENCH_REDIS_URL": url,
            "BENCH_PREFIX": PREFIX,
            "CELERY_RELIABLE_DEAD_LETTER_MAX": str(10**6),
        }
        print(
            f"{opts.entries} dead letters, {opts.unrelated} unrelated keys, one redis-server "
            "(broker and store, db 0)",
            flush=True,
        )
        fill(store, opts.entries)
        print(f"keys in db 0: {client.dbsize()}", flush=True)
        for args in (
            ("--help",),
            ("status",),
            ("dlq", "list"),
            ("dlq", "list", "--limit", str(opts.entries)),
        ):
            show(run(env, client, QUEUE, *args))
        if opts.replay_interrupt:
            row = run(
                env, client, QUEUE, "dlq", "replay", "--all", interrupt_after=opts.replay_interrupt
            )
            show(row)
            print(f"  interrupted: {row['queued']} queued; {row['last_line']}", flush=True)
            queued = row["queued"]
            print(f"  dead letters left: {client.zcard(PREFIX + ':{dlq}:index')}", flush=True)
            client.delete(QUEUE)
            client.slowlog_reset()
            left = client.zcard(PREFIX + ":{dlq}:index")
            print(f"  replayed + left = {queued + left} of {opts.entries}", flush=True)
        else:
            show(run(env, client, QUEUE, "dlq", "replay", "--all"))
        client.delete(QUEUE)
        fill(store, opts.entries)
        show(run(env, client, QUEUE, "dlq", "purge", "--all", "--yes"))
    finally:
        server.close()


if __name__ == "__main__":
    main()
