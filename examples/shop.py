"""A small shop that shows every celery-reliable feature (``examples/demo.sh`` runs it).

- ``ship_order``: fails into the dead-letter store until its cause is fixed, then replayed.
- ``pack_order``: a slow task; the demo ``kill -9``s its worker and SIGTERMs (drains) another.
- ``apply_event``: ordered per account across workers (``ordering_key``).
- ``notify``: one rate limit shared by every worker (``global_rate_limit``).
- ``charge_card``: guarded by the cluster-wide circuit breaker ``payments``.

``ship_order(order_id, sku)`` looks the SKU up in a catalog kept in Redis. An unknown SKU is
not worth retrying (``dead_letter_for``), so the task lands in the dead-letter store at
once; a flaky warehouse is retried twice and then dead-lettered too (``max_retries``).
Once the SKU is added, ``celery -A examples.shop:app reliable dlq replay ID`` runs the
order again and it ships.

Run it (``examples/demo.sh`` does all of this for you)::

    export SHOP_BROKER_URL=redis://127.0.0.1:6379/0   # or amqp://..., with SHOP_REDIS_URL
    celery -A examples.shop:app worker -l INFO
    python -m examples.shop place          # three orders, one for an unknown SKU
    celery -A examples.shop:app reliable dlq list
    python -m examples.shop add-sku lamp   # fix the cause
    celery -A examples.shop:app reliable dlq replay --task shop.ship_order
    python -m examples.shop shipped
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

import celery_reliable
from celery_reliable import DeadLetterStore, ReliableTask

#: The broker: Redis (the demo) or RabbitMQ (docker-compose.yml).
BROKER_URL = os.environ.get("SHOP_BROKER_URL", "redis://127.0.0.1:6379/0")
#: The Redis that holds the shop's catalog and celery-reliable's state (dead letters...).
REDIS_URL = os.environ.get("SHOP_REDIS_URL", BROKER_URL)
#: The queue the shop's tasks go to.
QUEUE = os.environ.get("SHOP_QUEUE", "shop")
#: Catalog of known SKUs (a Redis SET) and the list of shipped order ids.
CATALOG_KEY = "shop:catalog"
SHIPPED_KEY = "shop:shipped"
#: Hash of order id -> JSON list of (node, event, time) for ``pack_order`` runs.
PACKING_KEY = "shop:packing"
#: Per-demo-act records: account events, notifications, charge attempts (Redis lists).
EVENTS_KEY = "shop:events"
NOTIFIED_KEY = "shop:notified"
CHARGES_KEY = "shop:charges"
#: "down" while the payment gateway fails.
GATEWAY_KEY = "shop:gateway"
#: The shared rate limit of ``notify``, and the breaker of ``charge_card``.
NOTIFY_RATE = "5/s"
BREAKER_FAIL_MAX, BREAKER_RESET_TIMEOUT = 3, 2.0
#: Seconds after the breaker opened during which a charge may still start that was
#: admitted before it opened (in flight on another process): not counted as "while open".
ADMITTED_BEFORE_OPEN = 0.5
#: The orders ``place`` publishes: the lamp is not in the catalog yet.
ORDERS = [("order-1", "mug"), ("order-2", "lamp"), ("order-3", "mug")]
INITIAL_CATALOG = ("mug", "teapot")

app = Celery("shop", broker=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    reliable_redis_url=REDIS_URL,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
celery_reliable.install(app)


class UnknownSku(Exception):
    """The SKU is not in the catalog: retrying cannot help, a human must fix it."""


class WarehouseBusy(IOError):
    """A transient failure worth retrying."""


def db() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


@app.task(
    base=ReliableTask,
    bind=True,
    name="shop.ship_order",
    max_retries=2,
    autoretry_for=(WarehouseBusy,),
    default_retry_delay=0.2,
    dead_letter_for=(UnknownSku,),
)
def ship_order(self: Any, order_id: str, sku: str) -> str:
    """Ship one order; fails for good while ``sku`` is not in the catalog."""
    if not db().sismember(CATALOG_KEY, sku):
        raise UnknownSku(f"SKU {sku!r} is not in the catalog (order {order_id})")
    db().rpush(SHIPPED_KEY, order_id)
    replayed_from = (self.request.headers or {}).get("x-reliable-replayed-from")
    note = f" (replayed from dead letter {replayed_from})" if replayed_from else ""
    print(f"shipped {order_id}: {sku}{note}", flush=True)
    return order_id


@app.task(base=ReliableTask, bind=True, name="shop.pack_order")
def pack_order(self: Any, order_id: str, seconds: float) -> str:
    """A slow task (``seconds`` of packing): the demo kills its worker in the middle."""
    db().rpush(f"{PACKING_KEY}:{order_id}", f"started {self.request.hostname} {time.time()}")
    print(f"packing {order_id} on {self.request.hostname}", flush=True)
    time.sleep(seconds)
    db().rpush(f"{PACKING_KEY}:{order_id}", f"packed {self.request.hostname} {time.time()}")
    print(f"packed {order_id}", flush=True)
    return order_id


@app.task(base=ReliableTask, bind=True, name="shop.apply_event", ordering_key="account")
def apply_event(self: Any, account: str, n: int) -> int:
    """Apply event ``n`` of ``account``: events of one account run one at a time, in order."""
    start = time.time()
    time.sleep(0.05)
    db().rpush(EVENTS_KEY, json.dumps([account, n, self.request.hostname, start, time.time()]))
    return n


@app.task(
    base=ReliableTask,
    bind=True,
    name="shop.notify",
    global_rate_limit=NOTIFY_RATE,
    global_rate_burst=1,
)
def notify(self: Any, i: int) -> int:
    """Call a vendor that allows 5 calls per second in total, whatever the worker count."""
    db().rpush(NOTIFIED_KEY, json.dumps([i, self.request.hostname, time.time()]))
    return i


class GatewayDown(IOError):
    """The payment gateway failed (transient: retried, and counted by the breaker)."""


@app.task(
    base=ReliableTask,
    bind=True,
    name="shop.charge_card",
    breaker="payments",
    breaker_fail_max=BREAKER_FAIL_MAX,
    breaker_reset_timeout=BREAKER_RESET_TIMEOUT,
    autoretry_for=(GatewayDown,),
    max_retries=20,
    default_retry_delay=0.2,
)
def charge_card(self: Any, order_id: str) -> str:
    """Charge an order; fails while the gateway is down."""
    started = time.time()
    ok = db().get(GATEWAY_KEY) != "down"
    db().rpush(CHARGES_KEY, json.dumps([order_id, ok, self.request.hostname, started]))
    if not ok:
        raise GatewayDown(f"payment gateway down (order {order_id})")
    return order_id


# --- the producer and helpers the demo calls: python -m examples.shop COMMAND ---


def _wait(what: str, condition: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def short(node: str) -> str:
    return node.split("@")[0]


def demo_ordering(accounts: int = 2, events: int = 6, timeout: float = 30.0) -> None:
    """Publish interleaved events of several accounts; check each ran in order, alone."""
    db().delete(EVENTS_KEY)
    for n in range(1, events + 1):
        for a in range(accounts):
            apply_event.delay(f"account-{a + 1}", n)
    total = accounts * events
    _wait(f"{total} events", lambda: db().llen(EVENTS_KEY) >= total, timeout)
    rows = [json.loads(r) for r in db().lrange(EVENTS_KEY, 0, -1)]
    for a in range(accounts):
        account = f"account-{a + 1}"
        mine = sorted((r for r in rows if r[0] == account), key=lambda r: r[3])
        order = [r[1] for r in mine]
        overlap = any(y[3] < x[4] for x, y in itertools.pairwise(mine))
        nodes = sorted({short(r[2]) for r in mine})
        verdict = "in order" if order == sorted(order) and not overlap else "OUT OF ORDER"
        print(
            f"{account}: events {' '.join(map(str, order))} ran {verdict}, one at a time, "
            f"on {' and '.join(nodes)}"
        )


def demo_rate(count: int = 15, timeout: float = 30.0) -> None:
    """Publish a burst of notifications; measure the starts across every worker."""
    db().delete(NOTIFIED_KEY)
    for i in range(count):
        notify.delay(i)
    _wait(f"{count} notifications", lambda: db().llen(NOTIFIED_KEY) >= count, timeout)
    rows = [json.loads(r) for r in db().lrange(NOTIFIED_KEY, 0, -1)]
    times = sorted(r[2] for r in rows)
    span = times[-1] - times[0]
    nodes = sorted({short(r[1]) for r in rows})
    print(
        f"{count} notifications started over {span:.1f}s on {' and '.join(nodes)}: "
        f"{(count - 1) / span:.1f}/s for the cluster (limit {NOTIFY_RATE}, burst 1)"
    )


def demo_breaker(charges: int = 4, timeout: float = 40.0) -> None:
    """The gateway fails: the breaker opens, one probe runs after the reset timeout and
    closes it once the gateway is back, then the waiting charges go through."""
    from celery_reliable.status import collect

    db().delete(CHARGES_KEY)
    db().set(GATEWAY_KEY, "down")
    for i in range(charges):
        charge_card.delay(f"order-{10 + i}")

    def breaker() -> dict[str, Any]:
        return dict(collect(app).get("breakers", {}).get("payments", {}))

    _wait("breaker payments to open", lambda: breaker().get("state") == "open", timeout)
    opened_at = float(breaker().get("opened_at") or time.time())
    fails = sum(1 for r in db().lrange(CHARGES_KEY, 0, -1) if not json.loads(r)[1])
    print(f"gateway down: {fails} failed charges cluster-wide -> breaker 'payments' OPEN")
    db().set(GATEWAY_KEY, "up")
    print("gateway back up; charges wait (deferred, not retried) for the reset timeout")
    _wait("breaker payments to close", lambda: breaker().get("state") == "closed", timeout)

    def succeeded() -> list[list[Any]]:
        return [r for r in map(json.loads, db().lrange(CHARGES_KEY, 0, -1)) if r[1]]

    _wait(f"{charges} charges", lambda: len({r[0] for r in succeeded()}) >= charges, timeout)
    rows = [json.loads(r) for r in db().lrange(CHARGES_KEY, 0, -1)]
    probe = min((r for r in rows if r[1]), key=lambda r: r[3])
    # a run admitted just before the breaker opened may start just after: not "while open"
    while_open = [r for r in rows if opened_at + ADMITTED_BEFORE_OPEN <= r[3] < probe[3]]
    later = [r for r in rows if r[3] > probe[3]]
    print(
        f"while open: {len(while_open)} charges ran; one probe ran {probe[3] - opened_at:.1f}s "
        f"after opening (reset timeout {BREAKER_RESET_TIMEOUT:g}s) and succeeded -> CLOSED; "
        f"then the other {len(later)} charges ran"
    )


def wait_packed(order_id: str, timeout: float) -> None:
    """Wait until ``order_id`` was packed; print each run and the recovery time."""
    deadline = time.monotonic() + timeout
    key = f"{PACKING_KEY}:{order_id}"
    while not any(e.startswith("packed") for e in db().lrange(key, 0, -1)):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {order_id} to be packed: {db().lrange(key, 0, -1)}")
        time.sleep(0.1)
    runs = [e.split() for e in db().lrange(key, 0, -1)]
    for event, node, _ in runs:
        print(f"  {event:<8} on {node}")
    starts = [float(t) for event, _, t in runs if event == "started"]
    killed = float(db().get("shop:killed_at") or 0)
    if len(starts) == 2 and killed:
        print(
            f"the task ran again {starts[1] - killed:.1f}s after kill -9 "
            "(the broker's visibility timeout is one hour)"
        )


def place() -> None:
    db().sadd(CATALOG_KEY, *INITIAL_CATALOG)
    for order_id, sku in ORDERS:
        result = ship_order.delay(order_id, sku)
        print(f"placed {order_id} ({sku}) as task {result.id}")


def wait(shipped: int, dead: int, timeout: float) -> None:
    store = DeadLetterStore(app)
    deadline = time.monotonic() + timeout
    while True:
        now_shipped, now_dead = db().llen(SHIPPED_KEY), store.count()
        if (now_shipped, now_dead) == (shipped, dead):
            print(f"{now_shipped} shipped, {now_dead} dead-lettered")
            return
        if time.monotonic() > deadline:
            sys.exit(f"timed out: {now_shipped} shipped, {now_dead} dead-lettered")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.shop")
    sub = parser.add_subparsers(dest="command", required=True)
    placing = sub.add_parser("place", help="publish the demo orders")
    placing.add_argument(
        "--wait", action="store_true", help="then wait until 2 shipped and 1 dead-lettered"
    )
    add = sub.add_parser("add-sku", help="add a SKU to the catalog (the fix)")
    add.add_argument("sku")
    sub.add_parser("shipped", help="list shipped orders")
    pack = sub.add_parser("pack", help="publish a slow packing task")
    pack.add_argument("order_id")
    pack.add_argument("--seconds", type=float, default=4.0)
    killed = sub.add_parser("killed", help="note the time of a kill -9 (for the recovery time)")
    killed.add_argument("--at", type=float, default=None, help="Unix time of the kill")
    wp = sub.add_parser("wait-packed", help="wait until an order was packed")
    wp.add_argument("order_id")
    wp.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("demo-ordering", help="ordered events of two accounts across workers")
    sub.add_parser("demo-rate", help="a burst of notifications under one shared rate limit")
    sub.add_parser("demo-breaker", help="a failing gateway opens the breaker; a probe closes it")
    w = sub.add_parser("wait", help="wait until that many orders shipped / dead-lettered")
    w.add_argument("--shipped", type=int, required=True)
    w.add_argument("--dead", type=int, required=True)
    w.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.command == "place":
        place()
        if args.wait:
            wait(shipped=2, dead=1, timeout=60.0)
    elif args.command == "add-sku":
        db().sadd(CATALOG_KEY, args.sku)
        print(f"added {args.sku!r} to the catalog")
    elif args.command == "pack":
        result = pack_order.delay(args.order_id, args.seconds)
        print(f"placed packing of {args.order_id} ({args.seconds:g}s) as task {result.id}")
    elif args.command == "killed":
        db().set("shop:killed_at", args.at or time.time())
    elif args.command == "wait-packed":
        wait_packed(args.order_id, args.timeout)
    elif args.command == "demo-ordering":
        demo_ordering()
    elif args.command == "demo-rate":
        demo_rate()
    elif args.command == "demo-breaker":
        demo_breaker()
    elif args.command == "shipped":
        print("shipped:", ", ".join(db().lrange(SHIPPED_KEY, 0, -1)) or "nothing")
    else:
        wait(args.shipped, args.dead, args.timeout)


if __name__ == "__main__":
    main()
