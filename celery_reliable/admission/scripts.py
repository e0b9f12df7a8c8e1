"""The Lua scripts of this feature (each file's header gives its KEYS, ARGV and reply)."""

from __future__ import annotations

from ..core.store import Lua

ADMIT = Lua(__package__, "admit")
BREAKER_REPORT = Lua(__package__, "breaker_report")
