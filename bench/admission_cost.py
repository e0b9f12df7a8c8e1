"""Cost of one admission decision (``admit.lua``) against a SET, on a private redis-server.

Run: ``.venv/bin/python -m bench.admission_cost`` (needs ``redis-server`` on PATH).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery_reliable.admission.extension import (
    breaker_key,
    bucket_index_key,
    bucket_key,
    copy_key,
    started_copy_key,
)
from celery_reliable.admission.scripts import ADMIT
from celery_reliable.core.config import Settings
from celery_reliable.core.store import RedisStore
from celery_reliable.testing import RedisServer

#: Calls per measurement.
CALLS = 5000


def per_call_us(fn: Callable[[int], Any]) -> float:
    fn(0)
    start = time.perf_counter()
    for i in range(CALLS):
        fn(i)
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    server = RedisServer().start()
    try:
        store = RedisStore(Settings(redis_url=server.url(0), key_prefix="bench"))

        def admit(i: int, breaker: bool) -> Any:
            # a bucket that never runs dry (1 µs interval), so every call is a "run"
            keys = [copy_key(store, str(i)), started_copy_key(store, str(i))]
            keys += [bucket_key(store, "b"), bucket_index_key(store)]
            argv: list[Any] = ["1", 1, 1_000_000, 0, "0", 0, 0, str(i), 300_000_000, 1_000_000]
            argv += ["", 50_000, "b", 600_000_000]
            if breaker:
                keys.append(breaker_key(store, "v"))
                argv[4:7] = ["1", 1_000_000, 1_000_000]
            return store.run(ADMIT, keys, argv)

        set_us = per_call_us(lambda i: store.client.set("k", i))
        bucket_us = per_call_us(lambda i: admit(i, False))
        both_us = per_call_us(lambda i: admit(i, True))
        print(
            f"SET {set_us:.0f} µs; admit.lua with a bucket {bucket_us:.0f} µs, "
            f"with a bucket and a breaker {both_us:.0f} µs"
        )
    finally:
        server.close()


if __name__ == "__main__":
    main()
