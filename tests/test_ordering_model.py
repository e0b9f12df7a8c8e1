"""Property test of the ordering scripts (the real Lua, on the private redis-server)
against a simple model: a broker that delivers messages in any order, duplicates them,
crashes holders, revokes tasks and loses publishes. Whatever happens, a key never has two
holders, never starts a number before every earlier one finished, was cancelled or was
skipped, completes each number once, and skips only numbers that were never published."""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from celery_reliable.core.config import Settings
from celery_reliable.core.store import RedisStore
from celery_reliable.ordering.extension import STATE_TTL_MS, key_names
from celery_reliable.ordering.scripts import ORD_CANCEL, ORD_END, ORD_PUBLISH, ORD_START, ORD_SWEEP

KEYS = ("a", "b")
LEASE_MS = 60_000
NEVER_MS = 10**15  # a gap timeout no test run reaches


class OrderingModel(RuleBasedStateMachine):
    server_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.store = RedisStore(
            Settings(redis_url=self.server_url, key_prefix="m" + uuid.uuid4().hex[:8])
        )
        self.keys = {k: key_names(self.store, "g", k) for k in KEYS}
        self.published: dict[str, list[int]] = defaultdict(list)
        self.lost: set[tuple[str, int]] = set()
        self.broker: list[tuple[str, int]] = []
        self.running: dict[str, tuple[int, int]] = {}
        self.done: Counter[tuple[str, int]] = Counter()
        self.cancelled: set[tuple[str, int]] = set()
        self.skipped: set[tuple[str, int]] = set()
        self.revoked: set[tuple[str, int]] = set()
        self.crashed: list[tuple[str, int, int, int]] = []  # key, seq, token, starts then
        self.starts: Counter[str] = Counter()

    # --- the system under test ---

    def run(self, name: str, key: str, *args: object) -> list:
        return self.store.run(name, self.keys[key], list(args))

    def handed(self, reply: list) -> None:
        """A script returned a parked task to re-publish: it goes back to the broker."""
        data = json.loads(reply[-1])
        self.broker.append((data["key"], data["seq"]))

    def finished(self, key: str, seq: int) -> set[int]:
        return {
            s
            for s in self.published[key]
            if (key, s) in self.done or (key, s) in self.cancelled or (key, s) in self.skipped
        }

    def deliver_message(self, key: str, seq: int) -> None:
        if (key, seq) in self.revoked:  # the worker sees a revoked id: task_revoked
            reply = self.run(ORD_CANCEL, key, seq, "0", STATE_TTL_MS)
            if reply[0] in ("ok", "next", "later"):
                self.cancelled.add((key, seq))
            if reply[0] == "next":
                self.handed(reply)
            return
        payload = json.dumps({"key": key, "seq": seq})
        reply = self.run(ORD_START, key, seq, LEASE_MS, payload, STATE_TTL_MS)
        if reply[0] == "run":
            assert key not in self.running, (
                f"{key}: #{seq} started while #{self.running[key][0]} runs"
            )
            missing = set(range(1, seq)) - self.finished(key, seq)
            assert not missing, f"{key}: #{seq} started before {sorted(missing)}"
            assert self.done[(key, seq)] == 0, f"{key}: #{seq} runs again after completing"
            self.running[key] = (seq, int(reply[1]))
            self.starts[key] += 1
        elif reply[0] == "stale":
            if int(reply[1]):
                assert (key, seq) in self.skipped
            else:
                assert self.done[(key, seq)] or (key, seq) in self.cancelled
        else:
            assert reply[0] == "park"

    # --- rules: what producers, brokers and workers may do ---

    @rule(key=st.sampled_from(KEYS), lost=st.booleans(), weight=st.integers(0, 3))
    def publish(self, key: str, lost: bool, weight: int) -> None:
        seq = int(self.store.run(ORD_PUBLISH, self.keys[key][:1], [STATE_TTL_MS, 0]))
        self.published[key].append(seq)
        if lost and weight == 0:  # rarely: the producer died between place and publish
            self.lost.add((key, seq))
        else:
            self.broker.append((key, seq))

    @rule(i=st.integers(0, 50))
    def deliver(self, i: int) -> None:
        if self.broker:
            self.deliver_message(*self.broker.pop(i % len(self.broker)))

    @rule(i=st.integers(0, 50))
    def duplicate(self, i: int) -> None:
        if self.broker:
            self.broker.append(self.broker[i % len(self.broker)])

    @rule(key=st.sampled_from(KEYS), again=st.booleans())
    def finish(self, key: str, again: bool) -> None:
        if key not in self.running:
            return
        seq, token = self.running.pop(key)
        reply = self.run(ORD_END, key, seq, token, "again" if again else "done", 0)
        assert reply[0] != "fenced"
        if again:
            self.broker.append((key, seq))  # the retry message
        else:
            self.done[(key, seq)] += 1
        if reply[0] == "next":
            self.handed(reply)

    @rule(key=st.sampled_from(KEYS))
    def crash(self, key: str) -> None:
        """The holder's process dies: its lease runs out and the broker redelivers."""
        if key not in self.running:
            return
        seq, token = self.running.pop(key)
        self.store.client.hset(self.keys[key][0], "lease", 0)  # time passes beyond the lease
        self.crashed.append((key, seq, token, self.starts[key]))
        self.broker.append((key, seq))

    @rule(i=st.integers(0, 50))
    def zombie_ends(self, i: int) -> None:
        """A holder thought dead finishes after all: fenced if the key was taken over."""
        if not self.crashed:
            return
        key, seq, token, starts = self.crashed.pop(i % len(self.crashed))
        reply = self.run(ORD_END, key, seq, token, "done", 0)
        if self.starts[key] > starts or self.done[(key, seq)]:
            assert reply[0] == "fenced", f"{key}: #{seq} zombie advanced a taken-over key"
        if reply[0] != "fenced":
            self.done[(key, seq)] += 1
            if reply[0] == "next":
                self.handed(reply)

    @rule(i=st.integers(0, 50))
    def revoke(self, i: int) -> None:
        if self.broker:
            self.revoked.add(self.broker[i % len(self.broker)])

    @rule(key=st.sampled_from(KEYS))
    def sweep(self, key: str) -> None:
        """A sweep with an immediate hand-off timeout (redo at once) but no gap skips."""
        reply = self.run(ORD_SWEEP, key, NEVER_MS, 0)
        assert reply[0] != "skipped"
        if reply[0] == "republish":
            self.handed(reply)

    @invariant()
    def each_number_completes_once(self) -> None:
        assert all(n == 1 for n in self.done.values()), self.done

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            client = self.store.client
            keys = list(client.scan_iter(self.store.prefix + ":*"))
            if keys:
                client.delete(*keys)

    def drain(self) -> None:
        """Deliver everything, finish every holder, sweep with zero timeouts: every
        published number ends done, cancelled, or (only if never published) skipped."""
        for _ in range(500):
            while self.broker:
                self.deliver_message(*self.broker.pop(0))
            for key in list(self.running):
                self.finish(key, again=False)
            verdicts = set()
            for key in KEYS:
                reply = self.run(ORD_SWEEP, key, 0, 0)
                verdicts.add(reply[0])
                if reply[0] == "skipped":
                    self.skipped.add((key, int(reply[1])))
                    if reply[2]:
                        self.handed(reply)
                elif reply[0] == "republish":
                    self.handed(reply)
            if not self.broker and not self.running and verdicts == {"idle"}:
                break
        assert self.skipped <= self.lost, f"skipped published numbers: {self.skipped - self.lost}"
        for key in KEYS:
            ended = self.finished(key, 0)
            left = sorted(set(self.published[key]) - ended)
            # only lost numbers with nothing after them may stay (nobody waits on them)
            assert all((key, s) in self.lost for s in left), f"{key}: never ran {left}"
            completed = [s for s in self.published[key] if self.done[(key, s)]]
            assert not left or max(completed, default=0) < left[0]
        assert all(n == 1 for n in self.done.values())


def test_parking_and_advance_match_the_model(reliable_redis_server):
    OrderingModel.server_url = reliable_redis_server.url(2)
    test = OrderingModel.TestCase
    test.settings = settings(
        max_examples=200,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    test().runTest()
