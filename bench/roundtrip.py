"""Benchmark: what one store round trip costs the calling process, in CPU and in wall time.

Run from the repository root:

    .venv/bin/python -m bench.roundtrip --calls 3000

Each row runs one kind of call ``--calls`` times in a row from this process against a
private ``redis-server`` and reports the median over ``--rounds`` rounds of the caller's
CPU time per call (user + system, from ``time.process_time``) and its wall time per call.
The rows go from the cheapest possible round trip (PING) to the two scripts an ordered
task runs (the start chain that takes the key, and the end that advances it), so the
difference between rows is what the arguments and the script cost on top of the trip.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from celery_reliable.core.chain import ScriptCall, run_chain
from celery_reliable.core.config import Settings
from celery_reliable.core.store import RedisStore
from celery_reliable.ordering.extension import STATE_TTL_MS, key_names
from celery_reliable.ordering.scripts import ORD_END, ORD_INDEX, ORD_START
from celery_reliable.testing import RedisServer

#: Size of the task signature an ordered task's start sends (a small task's, in bytes).
SIGNATURE_BYTES = 550
#: The ordering lease the start asks for, in ms (the default worker timeout).
LEASE_MS = 10_000


def measure(call: Callable[[int], object], calls: int) -> tuple[float, float]:
    """``(CPU µs, wall µs)`` per call over ``calls`` calls of ``call(i)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(calls):
        call(i)
    return (
        1e6 * (time.process_time() - cpu) / calls,
        1e6 * (time.perf_counter() - wall) / calls,
    )


def rows(store: RedisStore) -> list[tuple[str, Callable[[int], object]]]:
    client = store.client
    trivial = client.script_load("return 1")
    signature = "x" * SIGNATURE_BYTES
    index = store.key("bench", "ord-index")

    def ord_keys(i: int) -> list[str]:
        return key_names(store, "bench", f"k{i}")

    def start(i: int) -> object:
        return run_chain(
            store,
            [
                ScriptCall(ORD_INDEX, [index], ['["bench", "k"]', i]),
                ScriptCall(ORD_START, ord_keys(i), [1, LEASE_MS, signature, STATE_TTL_MS], True),
            ],
        )

    def end(i: int) -> object:
        return run_chain(store, [ScriptCall(ORD_END, ord_keys(i), [1, 1, "done", 30_000])])

    return [
        ("PING", lambda i: client.ping()),
        ("EVALSHA of 'return 1'", lambda i: client.evalsha(trivial, 0)),
        ("ordering start (index + ord_start, one chain)", start),
        ("ordering end (ord_end)", end),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    server = RedisServer().start()
    try:
        store = RedisStore(Settings(redis_url=server.url(1), key_prefix="bench-rt"))
        results: dict[str, list[tuple[float, float]]] = {}
        for round_no in range(opts.rounds):
            store.client.flushdb()  # every round starts from fresh keys (the start grants)
            for name, call in rows(store):
                call(-1 - round_no)  # load the script, open the connection
                results.setdefault(name, []).append(measure(call, opts.calls))
        width = max(len(name) for name in results)
        print(f"bench.roundtrip: {opts.calls} calls x {opts.rounds} rounds, medians")
        print(f"{'call':<{width}} | CPU µs/call | wall µs/call")
        print(f"{'-' * width}-+-------------+-------------")
        for name, samples in results.items():
            cpu = statistics.median(s[0] for s in samples)
            wall = statistics.median(s[1] for s in samples)
            print(f"{name:<{width}} | {cpu:11.0f} | {wall:12.0f}")
    finally:
        server.close()


if __name__ == "__main__":
    main()
