"""The Lua scripts of this feature (each file's header gives its KEYS, ARGV and reply)."""

from __future__ import annotations

from ..core.store import Lua

DLQ_ADD = Lua(__package__, "dlq_add")
DLQ_REMOVE = Lua(__package__, "dlq_remove")
