"""Guarantee 3 (ordering) with real prefork workers: same-key tasks never overlap and start
in publish order; retries hold the key; dead letters, revokes, expiry and lost sequence
numbers release it; a kill -9 loses nothing and keeps the order."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

import pytest
import redis

from celery_reliable import ConfigurationError, DeadLetterStore, ReliableTask
from celery_reliable.core.store import store_for
from celery_reliable.ordering.extension import (
    HEADER,
    STATE_TTL_MS,
    assign_sequence,
    index_key,
    key_names,
    ordering_spec,
)
from celery_reliable.ordering.scripts import ORD_END, ORD_START
from celery_reliable.ordering.sweep import sweep_once
from celery_reliable.status import collect
from celery_reliable.testing import ReaperProcess, RedisServer, wait_for
from tests.apps import ordering
from tests.apps.common import events, make_app, recorder
from tests.conftest import ROOT

KEYS = 20
PER_KEY = 50
#: Fast lease and sweep for the crash test: lease 3 s (worker timeout), sweep every 1 s.
#: The reaper recovers a killed worker's tasks (the broker's visibility timeout stays at
#: kombu's default hour, so only the reaper can bring them back in time).
CRASH_ENV = {
    "CELERY_RELIABLE_WORKER_TIMEOUT": "3",
    "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "1",
    "CELERY_RELIABLE_REAPER_INTERVAL": "1",
}


def runs_by_key(app: Any) -> dict[str, list[dict[str, Any]]]:
    """Per key, every run (start event + its end event, if any), in start order."""
    ends = {(e["id"], e["pid"], e["retries"]): e for e in events(app, "ended")}
    ends.update({(e["id"], e["pid"], e["retries"]): e for e in events(app, "failed")})
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for start in events(app, "started"):
        end = ends.get((start["id"], start["pid"], start["retries"]))
        runs[start["key"]].append({**start, "end": end["t"] if end else None})
    for key_runs in runs.values():
        key_runs.sort(key=lambda r: r["t"])
    return runs


def check_order(runs: dict[str, list[dict[str, Any]]], killed_at: float | None = None) -> None:
    """No overlap and no out-of-order start per key. A run without an end was killed: it
    must end (at the kill) before anything else of its key starts, and be re-run next."""
    for key, key_runs in runs.items():
        previous: dict[str, Any] | None = None
        for run in key_runs:
            if previous is not None:
                end = previous["end"]
                if end is None:
                    assert killed_at is not None, f"{key}: run {previous} never ended"
                    end = killed_at
                    assert run["n"] == previous["n"], (
                        f"{key}: killed #{previous['n']} not re-run first"
                    )
                assert run["t"] >= end, f"{key}: #{run['n']} started before #{previous['n']} ended"
                assert run["n"] >= previous["n"], f"{key}: #{run['n']} after #{previous['n']}"
                assert run["seq"] >= previous["seq"], f"{key}: seq went backwards"
            previous = run


def max_parallel_keys(runs: dict[str, list[dict[str, Any]]]) -> int:
    edges = []
    for key_runs in runs.values():
        for run in key_runs:
            if run["end"] is not None:
                edges += [(run["t"], 1), (run["end"], -1)]
    best = current = 0
    for _, delta in sorted(edges):
        current += delta
        best = max(best, current)
    return best


def publish_interleaved(
    app: Any, keys: int, per_key: int, pause: float, long: tuple[str, int] | None = None
) -> dict[str, list[str]]:
    """Publish ``per_key`` steps for each of ``keys`` keys, round robin; the step ``long``
    (key, n), if given, holds until the test sets ``ordering.release_key`` (however
    loaded the machine, a kill while it runs interrupts it)."""
    step = app.tasks["ordering.step"]
    ids: dict[str, list[str]] = defaultdict(list)
    for n in range(per_key):
        for k in range(keys):
            took = -1.0 if (f"k{k}", n) == long else pause
            ids[f"k{k}"].append(step.delay(f"k{k}", n, took).id)
    return ids


def check_complete(app: Any, ids: dict[str, list[str]], per_key: int) -> None:
    ended = events(app, "ended")
    by_key: dict[str, list[int]] = defaultdict(list)
    for e in ended:
        by_key[e["key"]].append(e["n"])
    for key in ids:
        assert sorted(by_key[key]) == list(range(per_key)), f"{key}: ended {by_key[key]}"
    assert sorted(e["id"] for e in ended) == sorted(i for v in ids.values() for i in v)


def test_interleaved_keys_never_overlap_and_start_in_order(ns, start_worker):
    app = ns.app(ordering.build)
    for name in ("w1", "w2", "w3"):
        start_worker("ordering", name=name, concurrency=2)
    started = time.monotonic()
    ids = publish_interleaved(app, KEYS, PER_KEY, 0.002)
    total = KEYS * PER_KEY
    wait_for(lambda: len(events(app, "ended")) == total, 60, message=f"{total} tasks ended")
    elapsed = time.monotonic() - started
    check_complete(app, ids, PER_KEY)
    runs = runs_by_key(app)
    check_order(runs)
    assert max_parallel_keys(runs) >= 2, "different keys should run in parallel"
    assert len({e["hostname"] for e in events(app, "started")}) == 3
    assert len(events(app, "started")) == total, "no task ran twice"
    status = collect(app)["ordering"]
    assert status["parked"] == 0 and status["skipped"] == 0
    print(f"\n{total} ordered tasks over {KEYS} keys in {elapsed:.1f}s")


def stuck_keys(app: Any, ids: dict[str, list[str]], per_key: int) -> str:
    """For a failure message: the Redis state of keys whose tasks did not all end."""
    store = store_for(app)
    ended: dict[str, set[int]] = defaultdict(set)
    for e in events(app, "ended"):
        ended[e["key"]].add(e["n"])
    lines = []
    for key in ids:
        missing = sorted(set(range(per_key)) - ended[key])
        if missing:
            state, parked = key_names(store, "ordering.step", key)
            lines.append(
                f"{key}: missing {missing[:5]} state {store.client.hgetall(state)} "
                f"parked {sorted(int(x) for x in store.client.hkeys(parked))[:5]}"
            )
    return "\n".join(lines) + f"\nstatus {collect(app)['ordering']}"


def unfinished(app: Any) -> list[tuple[str, int, str]]:
    ended = {(e["key"], e["n"]) for e in events(app, "ended")}
    return [
        (e["key"], e["n"], e["hostname"])
        for e in events(app, "started")
        if (e["key"], e["n"]) not in ended
    ]


def broker_unacked(ns: Any, ids: dict[str, list[str]]) -> str:
    """For a failure message: which tasks sit in the broker's unacked hash, and the TTL
    of kombu's restore mutex (a worker killed while holding it blocks restores)."""
    broker = redis.Redis.from_url(ns.broker_url, decode_responses=True)
    prefix = ns.broker_keyprefix
    unacked = broker.hgetall(prefix + "unacked")
    where = {i: k for k, v in ids.items() for i in v}
    held = []
    for raw in unacked.values():
        task_id = json.loads(raw)[0]["headers"]["id"]
        held.append(f"{where.get(task_id)}:{task_id[:8]}")
    return f"unacked {held[:20]} mutex ttl {broker.pttl(prefix + 'unacked_mutex')} ms"


def test_kill9_of_a_worker_keeps_order_and_loses_nothing(ns, start_worker, tmp_path):
    keys, per_key = KEYS, PER_KEY
    app = ns.app(ordering.build)
    reaper = ReaperProcess(
        "tests.apps.ordering:app",
        env=ns.env(**CRASH_ENV),
        log_path=tmp_path / "reaper.log",
        cwd=str(ROOT),
    )
    try:
        reaper.wait_started()
        _kill9_run(ns, app, start_worker, keys, per_key)
    finally:
        reaper.close()


def _kill9_run(ns: Any, app: Any, start_worker: Any, keys: int, per_key: int) -> None:
    workers = [
        start_worker("ordering", name=name, concurrency=2, env=CRASH_ENV)
        for name in ("w1", "w2", "w3")
    ]
    long = ("k3", per_key // 4)  # held until released: the kill is sure to interrupt it
    ids = publish_interleaved(app, keys, per_key, 0.02, long=long)
    total = keys * per_key

    def long_started() -> str | None:
        for e in events(app, "started"):
            if (e["key"], e["n"]) == long:
                return str(e["hostname"])
        return None

    host = wait_for(long_started, 60, message="the long step started")
    (victim,) = [w for w in workers if w.nodename == host]
    killed_at = time.time()
    victim.kill9()
    recorder(app).set(ordering.release_key(app), 1)  # its re-run (and nothing else) may end
    victim_runs = [e for e in events(app, "started") if e["hostname"] == victim.nodename]
    assert victim_runs, "the victim ran tasks before it was killed"

    def distinct_ended() -> int:
        return len({(e["key"], e["n"]) for e in events(app, "ended")})

    wait_for(
        lambda: distinct_ended() == total,
        60,
        message=lambda: (
            f"{total} tasks ended; stuck keys:\n{stuck_keys(app, ids, per_key)}\n"
            f"{broker_unacked(ns, ids)}\n"
            f"unfinished runs: {unfinished(app)}\n"
            + "\n".join(
                line
                for w in workers
                for line in w.log().splitlines()
                if "ordering:" in line or "ERROR" in line
            )[-6000:]
        ),
    )
    # At least once: a run that ended its body on the victim just before the kill, but
    # whose end script did not run, runs again (before its successors). Nothing else may.
    ended = events(app, "ended")
    counts = Counter((e["key"], e["n"]) for e in ended)
    for (key, n), times in counts.items():
        if times > 1:
            first = min((e for e in ended if (e["key"], e["n"]) == (key, n)), key=lambda e: e["t"])
            assert times == 2 and first["hostname"] == victim.nodename, f"{key}#{n} ran {times}x"
            assert first["t"] <= killed_at
    assert {e["id"] for e in ended} == {i for v in ids.values() for i in v}
    runs = runs_by_key(app)
    check_order(runs, killed_at=killed_at)
    interrupted = [r for rs in runs.values() for r in rs if r["end"] is None]
    print(f"\n{len(interrupted)} run(s) interrupted by kill -9 and re-run in order")
    assert long in {(r["key"], r["n"]) for r in interrupted}
    assert all(r["hostname"] == victim.nodename for r in interrupted)
    assert collect(app)["ordering"]["parked"] == 0


def test_retry_holds_the_key_and_dead_letter_releases_it(ns, start_worker):
    app = ns.app(ordering.build)
    start_worker("ordering", name="w1", concurrency=2)
    flaky = app.tasks["ordering.flaky"].delay("r", 0, 2)
    after = [app.tasks["ordering.step"].delay("r", n, 0.0) for n in (1, 2)]
    doomed = app.tasks["ordering.doomed"].delay("d", 0)
    after_doomed = app.tasks["ordering.step"].delay("d", 1, 0.0)
    wait_for(lambda: len(events(app, "ended")) == 5, 30, message="five runs ended")
    runs = runs_by_key(app)
    check_order(runs)
    assert [(r["n"], r["retries"]) for r in runs["r"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    ends = {e["id"]: e for e in events(app, "ended")}
    assert ends[after[0].id]["t"] >= ends[flaky.id]["t"]
    assert DeadLetterStore(app).get(doomed.id).reason == "dead_letter_for"
    assert [r["n"] for r in runs["d"]] == [0, 1] and after_doomed.id in ends


def test_revoked_expired_and_unpublished_do_not_block_their_keys(ns, start_worker):
    gap = 3.0
    env = {
        "CELERY_RELIABLE_ORDERING_GAP_TIMEOUT": str(gap),
        "CELERY_RELIABLE_REAPER_INTERVAL": "0.5",
    }
    app = ns.app(ordering.build)
    worker = start_worker("ordering", name="w1", concurrency=2, env=env)
    step = app.tasks["ordering.step"]
    first = step.delay("v", 0, 1.0)
    revoked = step.delay("v", 1)
    revoked.revoke()
    revoked_by_control = step.delay("v", 2)
    app.control.revoke(revoked_by_control.id)
    expired = step.apply_async(("v", 3), expires=0.5)
    last = step.delay("v", 4)
    # A producer that took a place and crashed before publishing:
    lost_at = time.time()
    assign_sequence(app, step, ("g", 0), {}, {})
    after_gap = [step.delay("g", n) for n in (1, 2)]
    # A delayed task (countdown longer than the gap timeout) is not a gap:
    delayed = step.apply_async(("e", 0), countdown=gap + 2)
    after_delayed = step.delay("e", 1)
    wait_for(lambda: len(events(app, "ended")) == 6, 30, message="six runs ended")
    ends = {e["id"]: e for e in events(app, "ended")}
    starts = {e["id"]: e for e in events(app, "started")}
    assert set(ends) == {
        first.id,
        last.id,
        *(r.id for r in after_gap),
        delayed.id,
        after_delayed.id,
    }
    assert [r["n"] for r in runs_by_key(app)["e"]] == [0, 1]
    assert revoked.id not in starts and expired.id not in starts
    # released at once (well before the gap timeout), by the revoke/expiry handling
    assert starts[last.id]["t"] - ends[first.id]["t"] < gap / 2
    # the missing number was waited for, then skipped; the rest kept its order
    g_runs = runs_by_key(app)["g"]
    assert [r["n"] for r in g_runs] == [1, 2]
    waited = starts[after_gap[0].id]["t"] - lost_at
    assert gap <= waited < gap + 3, f"the gap was skipped after {waited:.1f}s"
    status = collect(app)["ordering"]
    assert status["skipped"] == 1 and status["cancelled"] >= 3
    assert "skipped #1" in worker.log()


def test_an_ordered_task_costs_one_script_call_at_publish_start_and_end(ns, start_worker):
    """Counted on a coordination Redis of its own (the broker's Lua is not mixed in):
    3 EVALSHA per ordered task (publish, start, end). The sweep-index ZADD and the
    in-flight ledger ride in the start and end scripts (tests/test_cost.py counts every
    combination of features); heartbeats are pushed out of the window."""
    coordination = RedisServer().start()
    try:
        ns.redis_url = coordination.url(0)
        app = ns.app(ordering.build)
        quiet = {
            "CELERY_RELIABLE_REAPER_INTERVAL": "3600",
            "CELERY_RELIABLE_HEARTBEAT_INTERVAL": "3600",
            "CELERY_RELIABLE_WORKER_TIMEOUT": "7200",
        }
        start_worker("ordering", name="w1", env=quiet)
        step = app.tasks["ordering.step"]
        client = redis.Redis.from_url(ns.redis_url)

        def calls(command: str) -> int:
            stats = client.info("commandstats").get(f"cmdstat_{command}", {})
            return int(stats.get("calls", 0))

        def run(key: str) -> None:
            before = len(events(app, "ended"))
            step.delay(key, 0)
            wait_for(lambda: len(events(app, "ended")) == before + 1, 20, message=f"{key} ran")

        run("warm-up")  # loads the scripts into the server
        evalsha, zadd = calls("evalsha"), calls("zadd")
        tasks = 20
        for i in range(tasks):
            run(f"rt{i}")
        publish_start_end = 3
        assert calls("evalsha") - evalsha == publish_start_end * tasks
        assert calls("zadd") - zadd == tasks
    finally:
        coordination.close()


def test_every_publish_path_takes_a_place_and_a_retry_keeps_it(ns):
    """delay, send_task by name (options by keyword or by position) all take the next
    place; re-publishing the same task id (what a retry does) keeps its place."""
    app = ns.app(ordering.build)
    step = app.tasks["ordering.step"]
    first = step.delay("p", 0)
    app.send_task("ordering.step", ("p", 1))
    app.send_task("ordering.step", ("p", 2), None, None, None, "by-position")
    step.apply_async(
        ("p", 0), task_id=first.id, headers={HEADER: ["ordering.step", "p", 1, first.id]}
    )
    step.apply_async(("q", 0))
    broker = redis.Redis.from_url(ns.broker_url)
    messages = [json.loads(m) for m in broker.lrange(ns.broker_keyprefix + ns.queue, 0, -1)]
    places = [m["headers"][HEADER] for m in reversed(messages)]  # LPUSH: newest first
    assert [p[:3] for p in places] == [
        ["ordering.step", "p", 1],
        ["ordering.step", "p", 2],
        ["ordering.step", "p", 3],
        ["ordering.step", "p", 1],
        ["ordering.step", "q", 1],
    ]
    assert places[0][3] == places[3][3] == first.id and places[2][3] == "by-position"


def test_lease_is_renewed_so_a_redelivered_duplicate_of_a_long_task_waits(ns, start_worker):
    """A task running longer than its lease (3 s) and than the visibility timeout (2 s):
    the broker redelivers a duplicate while it runs. The renewed lease makes the duplicate
    park instead of taking the key over, so nothing overlaps and it runs once."""
    app = ns.app(ordering.build)
    start_worker("ordering", name="w1", concurrency=2, env=CRASH_ENV)
    step = app.tasks["ordering.step"]
    long = step.delay("L", 0, 6.0)
    nxt = step.delay("L", 1)
    wait_for(lambda: len(events(app, "ended")) == 2, 30, message="both ended")
    runs = runs_by_key(app)["L"]
    check_order({"L": runs})
    assert [r["id"] for r in runs] == [long.id, nxt.id], "the long task ran once"
    status = collect(app)["ordering"]
    assert status["fenced"] == 0 and status["parked"] == 0


def test_sweep_redoes_a_lost_hand_off_and_forgets_idle_keys(ns):
    """The process that advanced the key died before re-publishing the next task: the
    next task is still parked, and the sweep re-publishes it (once), same id and place."""
    app = ns.app(ordering.build)
    step = app.tasks["ordering.step"]
    store = store_for(app)
    keys = key_names(store, "ordering.step", "h")
    places = [assign_sequence(app, step, ("h", n), {}, {}) for n in (0, 1)]
    payloads = [json.dumps(dict(step.s("h", n).set(**places[n]))) for n in (0, 1)]
    run = store.run(ORD_START, keys, [1, 60_000, payloads[0], STATE_TTL_MS])
    assert run[0] == "run"
    assert store.run(ORD_START, keys, [2, 60_000, payloads[1], STATE_TTL_MS]) == ["park"]
    store.client.zadd(index_key(store), {json.dumps(["ordering.step", "h"]): 1})
    end = store.run(ORD_END, keys, [1, run[1], "done", 0])
    assert end[0] == "next"  # ... and this process dies before publishing it
    assert sweep_once(app, handoff_timeout=5.0).republished == 0  # hand-off in flight
    assert sweep_once(app, handoff_timeout=0.0).republished == 1
    assert sweep_once(app, handoff_timeout=5.0).republished == 0  # recorded: not twice
    broker = redis.Redis.from_url(ns.broker_url)
    (message,) = [json.loads(m) for m in broker.lrange(ns.broker_keyprefix + ns.queue, 0, -1)]
    assert message["headers"]["id"] == places[1]["task_id"]
    assert message["headers"][HEADER][2] == 2
    assert collect(app)["ordering"]["parked"] == 1
    # it starts (the parked entry goes), ends, and the idle key leaves the sweep index
    run = store.run(ORD_START, keys, [2, 60_000, payloads[1], STATE_TTL_MS])
    assert store.run(ORD_END, keys, [2, run[1], "done", 0]) == ["ok"]
    report = sweep_once(app)
    assert report.idle == 1 and collect(app)["ordering"]["keys"] == 0


def test_bad_ordering_options_fail_naming_the_option():
    app = make_app("bad", "redis://127.0.0.1:1/0", "redis://127.0.0.1:1/1", "p", "q")

    @app.task(base=ReliableTask, shared=False, name="bad.key", ordering_key="acount_id")
    def bad_key(account_id: str) -> None: ...

    @app.task(
        base=ReliableTask, shared=False, name="bad.group", ordering_key="a", ordering_group=""
    )
    def bad_group(a: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"^ordering_key: task .bad.key. has no parameter"):
        ordering_spec(app.tasks["bad.key"])
    with pytest.raises(ConfigurationError, match=r"^ordering_group"):
        ordering_spec(app.tasks["bad.group"])


def test_worker_refuses_to_start_with_a_bad_ordering_key(start_worker):
    worker = start_worker("ordering_bad", wait=False)
    assert worker.wait_exit(30) != 0
    assert "ordering_key: task 'bad.key' has no parameter 'acount_id'" in worker.log()
