"""Measure the dead-letter store on a private redis-server.

Run: ``.venv/bin/python -m bench.dlq_bench`` (prints one line per measurement).
"""

from __future__ import annotations

import logging
import time

from celery import Celery

import celery_reliable
from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.testing import RedisServer

ENTRIES = 10_000
REPLAYS = 200


def main() -> None:
    logging.disable(logging.CRITICAL)  # time the store, not the log lines
    server = RedisServer().start()
    try:
        app = Celery("bench", broker=server.url(0), set_as_current=False)
        app.conf.update(reliable_dead_letter_max=ENTRIES, task_default_queue="bench")

        @app.task(name="bench.noop", shared=False)
        def noop(i: int) -> int:
            return i

        celery_reliable.install(app)
        store = DeadLetterStore(app)
        store.add(DeadLetter(id="warm", task_id="warm", task="bench.noop", failed_at=time.time()))
        tb = "Traceback (most recent call last):\n" + "  File 'x.py', line 1, in f\n" * 20
        start = time.perf_counter()
        for i in range(ENTRIES):
            store.add(
                DeadLetter(
                    id=f"id-{i}",
                    task_id=f"id-{i}",
                    task="bench.noop",
                    args=[i],
                    exception="ValueError",
                    error="bad",
                    traceback=tb,
                    failed_at=time.time(),
                )
            )
        per_add = (time.perf_counter() - start) / ENTRIES
        print(f"add (one EVALSHA, ~1 KiB entry): {per_add * 1e6:.0f} us per dead letter")
        start = time.perf_counter()
        for i in range(ENTRIES // 10):
            store.add(
                DeadLetter(id=f"over-{i}", task_id=None, task="bench.noop", failed_at=time.time())
            )
        per_add = (time.perf_counter() - start) / (ENTRIES // 10)
        print(f"add at capacity (evicts one each): {per_add * 1e6:.0f} us; stats {store.stats()}")
        start = time.perf_counter()
        listed = store.list(limit=50)
        print(f"list newest 50 of {store.count()}: {(time.perf_counter() - start) * 1e3:.1f} ms")
        start = time.perf_counter()
        listed = store.list(task="bench.noop", limit=50)
        print(f"list --task (50): {(time.perf_counter() - start) * 1e3:.1f} ms")
        ids = [e.id for e in store.list(limit=REPLAYS)]
        start = time.perf_counter()
        done = store.replay(ids)
        elapsed = time.perf_counter() - start
        print(f"replay {len(done)} entries: {elapsed / len(done) * 1e3:.2f} ms per entry")
        assert len(listed) == 50
    finally:
        server.close()


if __name__ == "__main__":
    main()
