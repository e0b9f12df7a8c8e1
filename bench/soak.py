"""Chaos soak: real workers, random kill -9s, a SIGTERM and a store restart; every task
accounted for.

The run (seeded: the same seed replays the same mix and the same fault schedule): a broker
Redis, a coordination Redis (with AOF persistence, restarted once), ``--workers`` prefork
workers and the reaper run ``--tasks`` tasks of ``bench.soak_app``: plain Celery tasks
(acks_late), ReliableTasks, ordered ones, rate-limited ones, breaker-guarded ones that fail a
few times first, and doomed ones that end in the dead-letter store. Meanwhile workers are
``kill -9``ed at random instants and restarted, one worker gets SIGTERM (a deploy) and
the coordination Redis is restarted.

The accounting at the end, from the events every run records (see ``bench.soak_app``):

- every id **succeeded exactly once** (doomed ones: **dead-lettered exactly once**, never
  succeeded);
- a task ran more than once only when a ``kill -9`` interrupted its earlier runs (each
  such re-run is counted); any other repeat is a violation;
- ordered tasks of one key never overlapped and started in publish order;
- what did not end is reported one by one: where its message is now (queue, kombu's
  ``unacked`` hash, nowhere) and the last thing it did.

Usage:
    python -m bench.soak [--tasks 20000] [--seed 1] [--kills 40] [--workers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from celery_reliable.testing import (
    ReaperProcess,
    RedisServer,
    WaitTimeout,
    WorkerProcess,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
#: Share of each kind of task in the mix.
MIX = (
    ("plain", 0.15),
    ("reliable", 0.30),
    ("ordered", 0.25),
    ("limited", 0.10),
    ("guarded", 0.10),
    ("doomed", 0.10),
)
#: Ordered tasks are spread over this many keys (each key runs one task at a time, a
#: hand-off per task: few keys would make the soak measure that latency, not losses).
ORDER_KEYS = 100
#: Seconds, after the last publish and the last fault, for everything to end.
SETTLE_TIMEOUT = 600.0
#: Seconds without a single new run event after which the soak stops waiting (what is
#: missing then will not come back without the broker's visibility timeout or an
#: ordering gap timeout): longer than reliable_ordering_gap_timeout (30 s) plus a sweep,
#: after which successors of a lost ordered task run.
STALL_TIMEOUT = 45.0
#: Seconds after a store restart during which a run may be requeued for it (a dead-letter
#: write waits up to 3 s for the store, then requeues).
STORE_OUTAGE_MARGIN = 5.0
#: Seconds between a run's end and its worker's kill within which the kill may have come
#: before the message's ack (or after a retry's publish), so the task runs again.
ACK_WINDOW = 10.0
#: Seconds a publish is retried while the store is restarting.
PUBLISH_PATIENCE = 60.0
#: Seconds a worker has to come up (restarts happen on a loaded machine).
READY_TIMEOUT = 60.0


@dataclass
class Fault:
    at: float  # seconds after the first publish
    kind: str  # "kill" | "sigterm" | "store_restart"
    worker: int = -1


@dataclass
class Report:
    """The accounting of one soak run."""

    seed: int
    tasks: int
    by_kind: dict[str, int]
    succeeded: int = 0
    dead_lettered: int = 0
    #: Runs repeated because a fault cut the earlier run short, by fault.
    reruns: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    sigterms: int = 0
    store_restarts: int = 0
    publish_retries: int = 0
    seconds: float = 0.0
    lost: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.violations

    def text(self) -> str:
        lines = [
            f"soak seed={self.seed}: {self.tasks} tasks "
            + ", ".join(f"{k} {v}" for k, v in self.by_kind.items()),
            f"faults: {self.kills} kill -9, {self.sigterms} SIGTERM, "
            f"{self.store_restarts} store restart; {self.seconds:.0f} s "
            f"({self.publish_retries} publish retries while the store restarted)",
            f"succeeded exactly once: {self.succeeded}",
            f"dead-lettered exactly once: {self.dead_lettered}",
            "re-runs of runs a fault cut short: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.reruns.items())) or "none"),
            f"not accounted for: {len(self.lost)}",
        ]
        groups = Counter((item["kind"], item["message"]) for item in self.lost)
        lines += [f"  {n:6d} {kind}: {where}" for (kind, where), n in groups.most_common()]
        lines += [f"  LOST {json.dumps(item, sort_keys=True)}" for item in self.lost[:20]]
        lines.append(f"violations: {len(self.violations)}")
        lines += [f"  {v}" for v in self.violations[:50]]
        lines.append("RESULT: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


class Soak:
    """One seeded soak run; :meth:`run` returns its :class:`Report`.

    Parameters:
      tasks: how many tasks to publish.
      seed: seeds the mix and the fault schedule.
      kills: how many random ``kill -9`` (each followed by a restart).
      workers, concurrency: prefork workers and pool processes each.
      publish_rate: tasks published per second (the faults land while work is in flight).
      log_dir: where worker, reaper and Redis logs go (kept after the run).
    """

    def __init__(
        self,
        tasks: int = 20_000,
        seed: int = 1,
        kills: int = 40,
        workers: int = 4,
        concurrency: int = 2,
        publish_rate: float = 100.0,
        log_dir: Path | None = None,
    ) -> None:
        self.tasks = tasks
        self.seed = seed
        self.kills = kills
        self.n_workers = workers
        self.concurrency = concurrency
        self.publish_rate = publish_rate
        self.rng = random.Random(seed)
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="reliable-soak-"))
        self.prefix = f"soak{uuid.uuid4().hex[:8]}"
        self.queue = f"{self.prefix}-q"
        self.killed_groups: dict[int, float] = {}  # process group -> kill time
        self.terminated_groups: set[int] = set()
        self.store_outages: list[tuple[float, float]] = []  # (down, up + write patience)
        self.workers: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set when the run ends early: inject nothing more

    # --- processes ---

    def env(self) -> dict[str, str]:
        return {
            "SOAK_BROKER_URL": self.broker.url(0),
            "SOAK_REDIS_URL": self.store.url(0),
            "SOAK_RECORD_URL": self.broker.url(2),
            "SOAK_PREFIX": self.prefix,
            "SOAK_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
        }

    def start_worker(self, i: int, wait: bool = True) -> WorkerProcess:
        worker = WorkerProcess(
            "bench.soak_app:app",
            name=f"soak{i}-{time.monotonic_ns()}",
            queues=[self.queue],
            concurrency=self.concurrency,
            env=self.env(),
            cwd=str(ROOT),
            log_dir=self.log_dir,
        ).start()
        return worker.wait_ready(READY_TIMEOUT) if wait else worker

    def start_reaper(self) -> ReaperProcess:
        return ReaperProcess(
            "bench.soak_app:app",
            env=self.env(),
            log_path=self.log_dir / "reaper.log",
            cwd=str(ROOT),
        )

    # --- the run ---

    def plan(self) -> tuple[list[tuple[str, str, tuple[Any, ...]]], list[Fault]]:
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        seqs: Counter[str] = Counter()
        mix: list[tuple[str, str, tuple[Any, ...]]] = []
        for i in range(self.tasks):
            kind = self.rng.choices(kinds, weights)[0]
            task_id = f"{kind}-{i}-{self.seed}"
            if kind == "ordered":
                key = f"k{self.rng.randrange(ORDER_KEYS)}"
                seqs[key] += 1
                args: tuple[Any, ...] = (key, seqs[key])
            elif kind == "guarded":
                args = (i, self.rng.choice((0, 0, 0, 1, 2)))
            else:
                args = (i,)
            mix.append((kind, task_id, args))
        span = self.tasks / self.publish_rate
        faults = [
            Fault(self.rng.uniform(0.05, 0.95) * span, "kill", self.rng.randrange(self.n_workers))
            for _ in range(self.kills)
        ]
        faults.append(Fault(0.5 * span, "sigterm", self.rng.randrange(self.n_workers)))
        faults.append(Fault(0.65 * span, "store_restart"))
        faults.sort(key=lambda f: f.at)
        return mix, faults

    def run(self) -> Report:
        mix, faults = self.plan()
        report = Report(self.seed, self.tasks, dict(Counter(kind for kind, _, _ in mix)))
        self.broker = RedisServer().start()
        self.store = RedisServer(args=["--appendonly", "yes", "--appendfsync", "always"])
        self.store.start()
        reaper = None
        injector: threading.Thread | None = None
        started = time.monotonic()
        try:
            os.environ.update(self.env())
            from bench import soak_app

            app = soak_app.app
            app.conf.broker_url = self.broker.url(0)
            app.conf.broker_transport_options = {
                **app.conf.broker_transport_options,
                "global_keyprefix": f"{self.prefix}:",
            }
            app.conf.reliable_redis_url = self.store.url(0)
            app.conf.reliable_key_prefix = self.prefix
            app.conf.task_default_queue = self.queue
            self.workers = [self.start_worker(i, wait=False) for i in range(self.n_workers)]
            for worker in self.workers:
                worker.wait_ready(READY_TIMEOUT)
            reaper = self.start_reaper()
            t0 = time.monotonic()
            injector = threading.Thread(target=self._inject, args=(faults, t0, report))
            injector.start()
            with app.producer_or_acquire() as producer:
                for n, (kind, task_id, args) in enumerate(mix):
                    delay = t0 + n / self.publish_rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    self._publish(app.tasks[f"soak.{kind}"], args, task_id, producer, report)
            injector.join()
            self._settle(app, mix)
            self._account(app, mix, report)
        finally:
            self._stop.set()
            if injector is not None:
                injector.join()
            report.seconds = time.monotonic() - started
            if reaper is not None:
                reaper.close()
            for worker in self.workers:
                worker.kill9()
            self.store.close()
            self.broker.close()
        return report

    def _publish(
        self, task: Any, args: tuple[Any, ...], task_id: str, producer: Any, report: Report
    ) -> None:
        """Publish, retrying while the store restarts (an ordered task's publish takes its
        place in the store first), as a producer with a retry policy would."""
        deadline = time.monotonic() + PUBLISH_PATIENCE
        while True:
            try:
                task.apply_async(args, task_id=task_id, queue=self.queue, producer=producer)
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                report.publish_retries += 1
                time.sleep(0.1)

    def _inject(self, faults: list[Fault], t0: float, report: Report) -> None:
        for fault in faults:
            if self._stop.wait(max(0.0, t0 + fault.at - time.monotonic())):
                return
            if fault.kind == "store_restart":
                down = time.time()
                self.store.stop()  # SIGTERM: Redis writes its AOF and exits
                self.store.start()
                self.store_outages.append((down, time.time() + STORE_OUTAGE_MARGIN))
                report.store_restarts += 1
                continue
            worker = self.workers[fault.worker]
            if fault.kind == "kill":
                with self._lock:
                    self.killed_groups[worker.pid] = time.time()
                worker.kill9()
                report.kills += 1
            else:
                self.terminated_groups.add(worker.pid)
                worker.terminate()
                wait_for(lambda w=worker: not w.alive, READY_TIMEOUT, message="SIGTERM exit")
                report.sigterms += 1
            self.workers[fault.worker] = self.start_worker(fault.worker)

    def _settle(self, app: Any, mix: list[tuple[str, str, tuple[Any, ...]]]) -> None:
        from bench.soak_app import events_key

        recorder = redis.Redis.from_url(self.broker.url(2), decode_responses=True)
        from celery_reliable import DeadLetterStore

        dlq = DeadLetterStore(app)
        want_end = {tid for kind, tid, _ in mix if kind != "doomed"}
        want_dead = {tid for kind, tid, _ in mix if kind == "doomed"}

        progress = [-1, time.monotonic()]  # events seen, when that count last changed

        def settled() -> bool:
            raw = recorder.lrange(events_key(self.prefix), 0, -1)
            if len(raw) != progress[0]:
                progress[:] = [len(raw), time.monotonic()]
            elif time.monotonic() - progress[1] > STALL_TIMEOUT:
                return True  # nothing moves any more: account for what is missing
            ended = {e["id"] for e in map(json.loads, raw) if e["ev"] == "end"}
            return want_end <= ended and dlq.count() >= len(want_dead)

        with contextlib.suppress(WaitTimeout):  # the accounting says what is missing
            wait_for(settled, SETTLE_TIMEOUT, interval=0.5, message="every task to end")

    def _cause(self, run: dict[str, Any], earlier: list[dict[str, Any]]) -> str | None:
        """Why a run did not end, or ended and ran again: a fault we injected, or None.

        ``earlier`` are the task's runs before this one: a run whose worker was killed
        soon after it ended (its retry published or its body done, its message not yet
        acknowledged) explains a second line of runs (at least once).
        """
        start = run["start"]
        if start["pg"] in self.killed_groups:
            return "kill"
        if start["pg"] in self.terminated_groups:
            return "sigterm"
        for begin, finish in self.store_outages:
            if begin - 1.0 <= start["t"] <= finish:
                return "store_restart"
        for prev in earlier:
            killed = self.killed_groups.get(prev["start"]["pg"])
            ended = prev["end"]["t"] if prev["end"] is not None else None
            if killed is not None and ended is not None and 0 <= killed - ended < ACK_WINDOW:
                return "kill before the ack"
        return None

    def _account(
        self, app: Any, mix: list[tuple[str, str, tuple[Any, ...]]], report: Report
    ) -> None:
        from bench.soak_app import events_key
        from celery_reliable import DeadLetterStore

        recorder = redis.Redis.from_url(self.broker.url(2), decode_responses=True)
        events = [json.loads(r) for r in recorder.lrange(events_key(self.prefix), 0, -1)]
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            if e["ev"] == "start":
                runs[e["id"]].append({"start": e, "end": None})
                continue
            for run in reversed(runs[e["id"]]):
                if run["end"] is None and run["start"]["pid"] == e["pid"]:
                    run["end"] = e
                    break
        letters = {entry.id: entry for entry in DeadLetterStore(app).list(limit=None)}
        dead = set(letters)
        where = self._message_locations()
        for tid, entry in letters.items():
            where.setdefault(tid, f"dead-lettered ({entry.reason})")
        for kind, tid, _args in mix:
            tr = runs.get(tid, [])
            final = "dead" if kind == "doomed" else "end"
            if kind == "doomed":
                done = [r for r in tr if r["end"] is not None and r["end"]["ev"] == "fail"]
                if any(r["end"] is not None and r["end"]["ev"] == "end" for r in tr):
                    report.violations.append(f"{tid}: a doomed task succeeded")
                    continue
                if tid not in dead:
                    report.lost.append(self._lost(tid, kind, tr, where))
                    continue
                report.dead_lettered += 1
            else:
                done = [r for r in tr if r["end"] is not None and r["end"]["ev"] == "end"]
                if not done:
                    report.lost.append(self._lost(tid, kind, tr, where))
                    continue
                report.succeeded += 1
            # Every run but the last completed one either ended in a retry (guarded tasks),
            # or was cut short (or left unacknowledged) by a fault we injected.
            last = done[-1]
            for run in tr:
                if run is last or (run["end"] is not None and run["end"]["ev"] == "retry"):
                    continue
                cause = self._cause(run, tr[: tr.index(run)])
                if cause is None:
                    what = run["end"]["ev"] if run["end"] else "never ended"
                    report.violations.append(
                        f"{tid}: an extra run on worker {run['start']['pg']} ({what}) that "
                        f"no fault explains; final state {final}"
                    )
                else:
                    report.reruns[cause] = report.reruns.get(cause, 0) + 1
        report.violations += self._ordering_violations(runs, mix)

    def _ordering_violations(
        self, runs: dict[str, list[dict[str, Any]]], mix: list[tuple[str, str, tuple[Any, ...]]]
    ) -> list[str]:
        out: list[str] = []
        by_key: dict[str, list[tuple[float, float, int, str]]] = defaultdict(list)
        for kind, tid, args in mix:
            if kind != "ordered":
                continue
            for run in runs.get(tid, []):
                start = run["start"]["t"]
                if run["end"] is not None:
                    end = run["end"]["t"]
                else:  # cut short: by a kill at the kill, else (requeued) at once
                    end = self.killed_groups.get(run["start"]["pg"], start)
                by_key[args[0]].append((start, end, args[1], tid))
        for key, spans in by_key.items():
            spans.sort()
            for (_s1, e1, n1, t1), (s2, _e2, n2, t2) in itertools.pairwise(spans):
                if s2 < e1:
                    out.append(f"ordering: {key} #{n1} ({t1}) and #{n2} ({t2}) overlapped")
                if n2 < n1:
                    out.append(f"ordering: {key} #{n2} started after #{n1}")
        return out

    def _message_locations(self) -> dict[str, str]:
        """Task id -> where its message is on the broker now (queue, unacked)."""
        client = redis.Redis.from_url(self.broker.url(0))
        where: dict[str, str] = {}
        for raw in client.lrange(f"{self.prefix}:{self.queue}", 0, -1):
            tid = json.loads(raw).get("headers", {}).get("id")
            where[str(tid)] = "on its queue"
        for raw in client.hvals(f"{self.prefix}:unacked"):
            payload = json.loads(raw)[0]
            tid = payload.get("headers", {}).get("id")
            where[str(tid)] = "in kombu's unacked hash (back after the visibility timeout)"
        store = redis.Redis.from_url(self.store.url(0), decode_responses=True)
        for key in store.scan_iter(match=f"{self.prefix}:{{ord:*}}:parked", count=1000):
            for raw in store.hvals(key):
                for tid in re.findall(r"ordered-\d+-\d+", raw):
                    where.setdefault(tid, "parked by ordering behind a missing predecessor")
        return where

    def _lost(
        self, tid: str, kind: str, tr: list[dict[str, Any]], where: dict[str, str]
    ) -> dict[str, Any]:
        last = tr[-1] if tr else None
        item: dict[str, Any] = {
            "id": tid,
            "kind": kind,
            "runs": len(tr),
            "message": where.get(tid, "nowhere on the broker"),
        }
        if last is not None:
            pg = last["start"]["pg"]
            item["last_run"] = {
                "worker": pg,
                "ended": last["end"]["ev"] if last["end"] else None,
                "worker_killed": pg in self.killed_groups,
            }
        return item


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0, help="tasks published per second")
    args = parser.parse_args(argv)
    soak = Soak(args.tasks, args.seed, args.kills, args.workers, publish_rate=args.rate)
    report = soak.run()
    print(report.text())
    print(f"logs: {soak.log_dir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
