"""Latency the in-flight ledger adds to each ReliableTask run, in the pool process.

Times the two scripts a task pays for (``ledger_start`` at start, ``ledger_end`` at the
end) against a private redis-server, as a pool process calls them, next to a plain SET for
scale.

Usage:
    python -m bench.ledger [--runs 5000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

from celery_reliable.core.config import Settings
from celery_reliable.core.store import RedisStore
from celery_reliable.orphans.registry import RegistryKeys, new_worker_id
from celery_reliable.orphans.scripts import LEDGER_END, LEDGER_START
from celery_reliable.testing import RedisServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    opts = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        store = RedisStore(Settings(redis_url=server.url(1), key_prefix="bench"))
        keys = RegistryKeys(store)
        wid = new_worker_id()
        entry = json.dumps({"tag": str(uuid.uuid4()), "task": "bench.noop", "t": time.time()})
        start_us, end_us, set_us = [], [], []
        for _ in range(opts.runs):
            task_id = str(uuid.uuid4())
            t0 = time.perf_counter()
            store.run(
                LEDGER_START,
                keys=[keys.ledger(wid), keys.workers, keys.recoveries(task_id)],
                args=[wid, task_id, entry],
            )
            t1 = time.perf_counter()
            store.run(
                LEDGER_END,
                keys=[keys.ledger(wid), keys.recoveries(task_id), keys.stats],
                args=[task_id, "1"],
            )
            t2 = time.perf_counter()
            store.client.set("bench:scale", task_id)
            t3 = time.perf_counter()
            start_us.append((t1 - t0) * 1e6)
            end_us.append((t2 - t1) * 1e6)
            set_us.append((t3 - t2) * 1e6)
        for name, values in (("ledger_start", start_us), ("ledger_end", end_us), ("SET", set_us)):
            print(f"{name:>12}: median {statistics.median(values):6.0f} us")
        per_task = statistics.median(start_us) + statistics.median(end_us)
        print(f"    per task: {per_task:.0f} us in the pool process ({opts.runs} runs)")
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
