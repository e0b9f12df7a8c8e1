"""Per-task cost of celery-reliable against plain Celery: one table from one invocation.

Every row is a median over alternating pairs (A then B, then B then A...) so drift of the
machine's load hits both sides; the range of the pairs' ratios is shown. Each drain round
pre-fills a fresh queue with ``--tasks`` no-op tasks, starts one real prefork worker
(``-c 2``, prefetch 16) and times from its first finished task to its last. The broker, the
coordination store and the tasks' finish counter are three private ``redis-server``\\ s, so
what the store served during the timed window is the package's own work: round trips per
task from ``INFO stats`` ``total_reads_processed`` (a script or a pipeline is one), EVALSHA
and all commands per task from ``INFO commandstats`` deltas (commands a script runs count
there too). CPU µs per task, from ``/proc`` and ``INFO cpu`` over the same window: the
worker's main process, its pool processes, and the broker and store ``redis-server``\\ s
together; on a loaded machine these hold up far better than the rates. Cells read
``baseline / variant``.

Rows:
  noop         a ReliableTask with no option vs a plain ``acks_late`` Task
  every        ordering (one key per task), a global rate far above the load and a closed
               breaker, all configured on one ReliableTask, vs the plain Task
  ordered      an ordered ReliableTask over 100 keys vs the same task unordered
  publish      ``ordered.delay()`` vs plain ``delay()``, publishes per second in-process
  publish-reliable   an unordered ReliableTask's ``delay()`` (the payload-size check) vs plain

Usage (from the repository root):
    .venv/bin/python -m bench.cost [--tasks 2000] [--pairs 5] [--rows noop,every,ordered,publish]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from celery_reliable.testing import RedisServer, WorkerProcess, wait_for

ROOT = Path(__file__).resolve().parent.parent
#: Keys the ``ordered`` row spreads its tasks over.
ORDERED_KEYS = 100
#: Commands the measurement itself sends to the store (never the package's).
OWN_COMMANDS = {"info"}


@dataclass
class Sample:
    """One timed run of one variant."""

    rate: float
    commands: dict[str, float] = field(default_factory=dict)

    @property
    def round_trips(self) -> float:
        return self.commands.get(ROUND_TRIPS, 0.0)

    @property
    def per_task(self) -> float:
        return sum(v for k, v in self.commands.items() if k != ROUND_TRIPS and k not in CPU_PARTS)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    baseline: str
    variant: str
    keys: int | None  # None: one key per task
    target: float
    publish: bool = False


ROWS = (
    Row("noop", "ReliableTask, no option / plain", "plain", "reliable", None, 0.95),
    Row("every", "every feature, not binding / plain", "plain", "every_feature", None, 0.90),
    Row("ordered", f"ordered / unordered, {ORDERED_KEYS} keys", "reliable", "ordered", 100, 0.90),
    Row("publish", "publish: ordered delay() / plain delay()", "plain", "ordered", None, 0.0, True),
    Row(
        "publish-reliable",
        "publish: ReliableTask delay() / plain",
        "plain",
        "reliable",
        None,
        0.0,
        True,
    ),
)


#: Pseudo-command holding the server's ``total_reads_processed``: one per request the
#: server read, i.e. per round trip (a pipeline or a script is one).
ROUND_TRIPS = "round trips"


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command (``INFO commandstats``; commands a script runs count too) and
    round trips, minus the INFO calls that read them."""
    stats = client.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_") not in OWN_COMMANDS
    }
    info_calls = int(stats.get("cmdstat_info", {}).get("calls", 0)) + 1
    reads = int(client.info("stats")["total_reads_processed"])
    calls[ROUND_TRIPS] = reads - info_calls
    return calls


#: Clock ticks per second of /proc's CPU times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Pseudo-commands holding CPU seconds, per process kind, turned into µs per task.
CPU_PARTS = ("cpu main", "cpu pool", "cpu redis")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def delta(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    out = {name: (calls - before.get(name, 0)) / n for name, calls in after.items()}
    return {name: v for name, v in out.items() if v}


class Bench:
    def __init__(self, tasks: int, concurrency: int) -> None:
        self.tasks = tasks
        self.concurrency = concurrency
        self.broker = RedisServer().start()
        self.store = RedisServer().start()
        self.counts = RedisServer().start()
        self.prefix = f"cost{uuid.uuid4().hex[:8]}"
        self.env = {
            "BENCH_BROKER_URL": self.broker.url(0),
            "BENCH_REDIS_URL": self.store.url(0),
            "BENCH_COUNT_URL": self.counts.url(0),
            "BENCH_PREFIX": self.prefix,
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update(self.env)
        from bench.app import app

        self.app = app
        self.store_client = redis.Redis.from_url(self.store.url(0))
        self.count_client = redis.Redis.from_url(self.counts.url(0))
        self.broker_client = redis.Redis.from_url(self.broker.url(0))
        self.done_key = f"{self.prefix}:bench:done"

    def close(self) -> None:
        for server in (self.broker, self.store, self.counts):
            server.close()

    def _fill(self, variant: str, keys: int | None, queue: str) -> None:
        task = self.app.tasks[f"cost.{variant}"]
        with self.app.producer_or_acquire() as producer:
            for i in range(self.tasks):
                key = f"k{i % keys}" if keys else f"k{i}"
                task.apply_async((i, key), queue=queue, producer=producer)

    def drain(self, variant: str, keys: int | None) -> Sample:
        queue = f"{self.prefix}-{uuid.uuid4().hex[:6]}"
        self.store_client.flushall()  # no earlier round's keys for this worker to sweep
        self._fill(variant, keys, queue)
        self.count_client.delete(self.done_key)
        worker = WorkerProcess(
            "bench.app:app",
            name=f"cost-{variant}",
            queues=[queue],
            concurrency=self.concurrency,
            env=self.env,
            cwd=str(ROOT),
            loglevel="WARNING",
        ).start()

        def finished() -> int:
            return int(self.count_client.get(self.done_key) or 0)

        try:
            wait_for(lambda: finished() >= 1, 60, interval=0.001, message="the first task")
            start, first = time.perf_counter(), finished()
            before = command_calls(self.store_client)
            pool = children_of(worker.pid)
            cpu_before = self._cpu(worker.pid, pool)
            wait_for(
                lambda: finished() >= self.tasks,
                600,
                interval=0.002,
                message=f"{self.tasks} {variant} tasks",
            )
            elapsed, last = time.perf_counter() - start, finished()
            after = command_calls(self.store_client)
            cpu_after = self._cpu(worker.pid, pool)
        finally:
            worker.close()
        n = last - first
        commands = delta(before, after, n)
        for part, b, a in zip(CPU_PARTS, cpu_before, cpu_after, strict=True):
            commands[part] = (a - b) * 1e6 / n
        return Sample(n / elapsed, commands)

    def _cpu(self, main: int, pool: list[int]) -> tuple[float, float, float]:
        """CPU seconds so far of the worker's main process, its pool processes, and the
        broker and store redis-servers together."""
        return (
            process_cpu(main),
            sum(process_cpu(pid) for pid in pool),
            redis_cpu(self.store_client) + redis_cpu(self.broker_client),
        )

    def publish(self, variant: str, keys: int | None) -> Sample:
        task = self.app.tasks[f"cost.{variant}"]
        queue = f"{self.prefix}-pub"
        before = command_calls(self.store_client)
        start = time.perf_counter()
        for i in range(self.tasks):
            task.apply_async((i, f"k{i}"), queue=queue)
        elapsed = time.perf_counter() - start
        after = command_calls(self.store_client)
        redis.Redis.from_url(self.broker.url(0)).delete(queue)
        return Sample(self.tasks / elapsed, delta(before, after, self.tasks))


def pairs(
    measure: Callable[[str, int | None], Sample], row: Row, n: int
) -> tuple[list[Sample], list[Sample]]:
    """``n`` alternating pairs: baseline first in even pairs, variant first in odd ones."""
    base: list[Sample] = []
    var: list[Sample] = []
    for i in range(n):
        order = ((row.baseline, base), (row.variant, var))
        for name, out in order if i % 2 == 0 else reversed(order):
            out.append(measure(name, row.keys))
            print(f"  {row.name} pair {i + 1}: {name} {out[-1].rate:.0f}/s", file=sys.stderr)
    return base, var


def median_of(samples: list[Sample], name: str) -> float:
    return statistics.median(s.commands.get(name, 0.0) for s in samples)


def costs_text(samples: list[Sample]) -> tuple[str, ...]:
    """Round trips, EVALSHA and all commands (those scripts run included), per task; CPU
    µs per task of the worker's main process, its pool processes and the redis-servers
    ('-' for publish rows)."""
    total = statistics.median(s.per_task for s in samples)
    cpu = tuple(
        f"{median_of(samples, part):.0f}" if part in samples[0].commands else "-"
        for part in CPU_PARTS
    )
    return (
        f"{median_of(samples, ROUND_TRIPS):.2f}",
        f"{median_of(samples, 'evalsha'):.2f}",
        f"{total:.1f}",
        *cpu,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS))
    opts = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the workers and servers started are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = opts.rows.split(",")
    bench = Bench(opts.tasks, opts.concurrency)
    results: list[tuple[Row, list[Sample], list[Sample]]] = []
    try:
        for variant in ("plain", "reliable", "ordered"):  # connections, scripts warmed up
            bench.publish(variant, None)
        for row in ROWS:
            if row.name in wanted:
                measure = bench.publish if row.publish else bench.drain
                results.append((row, *pairs(measure, row, opts.pairs)))
    finally:
        bench.close()
    load = os.getloadavg()
    print(
        f"bench.cost: {opts.tasks} tasks per run, {opts.pairs} alternating pairs per row, "
        f"prefork -c {opts.concurrency}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    header = (
        "row",
        "baseline/s",
        "variant/s",
        "ratio (range)",
        "target",
        "round trips/task",
        "evalsha/task",
        "commands/task",
        "CPU µs/task: main",
        "pool",
        "redis",
    )
    lines = [header]
    for row, base, var in results:
        ratios = sorted(v.rate / b.rate for b, v in zip(base, var, strict=True))
        target = f">= {row.target:.2f}" if row.target else "-"
        lines.append(
            (
                row.label,
                f"{statistics.median(s.rate for s in base):.0f}",
                f"{statistics.median(s.rate for s in var):.0f}",
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                target,
                *(f"{b} / {v}" for b, v in zip(costs_text(base), costs_text(var), strict=True)),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for j, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
