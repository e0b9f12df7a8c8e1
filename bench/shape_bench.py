"""Measure what checking a task message's shape costs the worker's main process.

Run: ``.venv/bin/python -m bench.shape_bench`` (prints one line per measurement). The
check runs once per message in the consumer, before Celery reads the message; Celery
decodes the body there anyway (the decoded body is cached on the message), so the
decode is timed apart from the check.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

from kombu import Message

from celery_reliable.deadletters.shape import message_problem

MESSAGES = 20_000


def message(eta: str | None = None) -> Message:
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": "shop.charge",
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(42, 10)",
        "kwargsrepr": "{}",
        "origin": "gen1@host",
        "ignore_result": False,
        "x-tenant": "acme",
    }
    body = json.dumps([[42, 10], {}, {"callbacks": None, "errbacks": None, "chain": None}])
    return Message(
        body=body.encode(),
        headers=headers,
        content_type="application/json",
        content_encoding="utf-8",
    )


def timed(label: str, messages: list[Message], check: bool) -> None:
    start = time.perf_counter()
    for m in messages:
        if check:
            assert message_problem(m) is None
        else:
            m.payload  # noqa: B018 (the decode Celery does anyway)
    per = (time.perf_counter() - start) / len(messages) * 1e6
    print(f"{label}: {per:.1f} µs per message")


def main() -> None:
    later = datetime.now(timezone.utc).isoformat()
    for label, eta in (("plain", None), ("with eta", later)):
        batch = [message(eta) for _ in range(MESSAGES)]
        timed(f"decode only ({label})", batch, check=False)
        timed(f"check, body already decoded ({label})", batch, check=True)


if __name__ == "__main__":
    main()
