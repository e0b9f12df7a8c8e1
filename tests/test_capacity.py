"""Capacity of the dead-letter store: ``reliable_dead_letter_max`` and
``reliable_dead_letter_ttl`` drop the oldest / expired entries, count them and log them."""

from __future__ import annotations

import dataclasses
import logging
import time

from celery_reliable import DeadLetter, DeadLetterStore
from celery_reliable.core.store import RedisStore
from tests.apps import basic


def entry(i: int, failed_at: float) -> DeadLetter:
    return DeadLetter(
        id=f"id-{i}", task_id=f"id-{i}", task="basic.permanent", args=[i], failed_at=failed_at
    )


def test_max_drops_the_oldest_and_counts_them(ns, caplog):
    app = ns.app(basic.build, reliable_dead_letter_max=3)
    store = DeadLetterStore(app)
    base = time.time() - 100
    with caplog.at_level(logging.WARNING, logger="celery_reliable.deadletters.store"):
        for i in range(5):
            assert store.add(entry(i, base + i))
    assert [e.id for e in store.list(limit=None)] == ["id-4", "id-3", "id-2"]
    assert store.stats() == {"added": 5, "expired": 0, "dropped": 2, "count": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("1 dropped (over reliable_dead_letter_max=3)" in w for w in warnings)
    # idempotent by id: adding an existing id again changes nothing
    assert not store.add(entry(4, base + 50))
    assert store.stats()["added"] == 5


def test_ttl_expires_old_entries_on_the_next_write_and_counts_them(ns, caplog):
    app = ns.app(basic.build, reliable_dead_letter_ttl=3600)
    store = DeadLetterStore(app)
    now = time.time()
    store.add(entry(1, now - 7200))  # older than the TTL: expired by this very write
    store.add(entry(2, now - 1800))
    store.add(entry(3, now - 60))
    assert store.stats()["expired"] == 1
    # the same store read with a shorter TTL: the next write expires what is now too old
    shorter = dataclasses.replace(store.settings, dead_letter_ttl=600.0)
    short = DeadLetterStore(app, RedisStore(shorter))
    with caplog.at_level(logging.WARNING, logger="celery_reliable.deadletters.store"):
        short.add(entry(4, now))
    assert [e.id for e in store.list(limit=None)] == ["id-4", "id-3"]
    assert store.stats() == {"added": 4, "expired": 2, "dropped": 0, "count": 2}
    assert any("1 entries expired" in r.getMessage() for r in caplog.records)


def test_an_idle_store_applies_retention_when_read(ns, caplog):
    """No new dead letter needed: list() and stats() expire what is past the TTL."""
    app = ns.app(basic.build)
    store = DeadLetterStore(app)
    now = time.time()
    store.add(entry(1, now - 7200))
    store.add(entry(2, now - 60))
    shorter = dataclasses.replace(store.settings, dead_letter_ttl=3600.0)
    reader = DeadLetterStore(app, RedisStore(shorter))
    with caplog.at_level(logging.WARNING, logger="celery_reliable.deadletters.store"):
        assert [e.id for e in reader.list(limit=None)] == ["id-2"]
    assert any("1 entries expired" in r.getMessage() for r in caplog.records)
    assert reader.stats() == {"added": 2, "expired": 1, "dropped": 0, "count": 1}
