"""Per-key ordering: tasks sharing a group and a key run one at a time, in publish order
(see docs/ordering.md).

Examples:
    >>> @app.task(base=ReliableTask, bind=True, ordering_key="account_id")
    ... def apply_event(self, account_id, event): ...
"""

from __future__ import annotations

from typing import Any

from ..core.state import add_extension
from .extension import OrderingExtension, status, wrap_send_task
from .sweep import install_worker_side

__all__ = ["install", "status"]


def install(app: Any) -> None:
    """Number tasks at publish, gate them at start, and run the sweep in workers."""
    wrap_send_task(app)
    add_extension(app, OrderingExtension(app))
    install_worker_side(app)
