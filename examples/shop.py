"""A small shop whose order task fails into the dead-letter store until its cause is fixed.

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
import os
import sys
import time
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


# --- the producer and helpers the demo calls: python -m examples.shop COMMAND ---


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
    sub.add_parser("place", help="publish the demo orders")
    add = sub.add_parser("add-sku", help="add a SKU to the catalog (the fix)")
    add.add_argument("sku")
    sub.add_parser("shipped", help="list shipped orders")
    pack = sub.add_parser("pack", help="publish a slow packing task")
    pack.add_argument("order_id")
    pack.add_argument("--seconds", type=float, default=4.0)
    sub.add_parser("killed", help="note the time of a kill -9 (for the recovery time)")
    wp = sub.add_parser("wait-packed", help="wait until an order was packed")
    wp.add_argument("order_id")
    wp.add_argument("--timeout", type=float, default=60.0)
    w = sub.add_parser("wait", help="wait until that many orders shipped / dead-lettered")
    w.add_argument("--shipped", type=int, required=True)
    w.add_argument("--dead", type=int, required=True)
    w.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.command == "place":
        place()
    elif args.command == "add-sku":
        db().sadd(CATALOG_KEY, args.sku)
        print(f"added {args.sku!r} to the catalog")
    elif args.command == "pack":
        result = pack_order.delay(args.order_id, args.seconds)
        print(f"placed packing of {args.order_id} ({args.seconds:g}s) as task {result.id}")
    elif args.command == "killed":
        db().set("shop:killed_at", time.time())
    elif args.command == "wait-packed":
        wait_packed(args.order_id, args.timeout)
    elif args.command == "shipped":
        print("shipped:", ", ".join(db().lrange(SHIPPED_KEY, 0, -1)) or "nothing")
    else:
        wait(args.shipped, args.dead, args.timeout)


if __name__ == "__main__":
    main()
