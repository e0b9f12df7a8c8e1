"""The Lua scripts of this feature (each file's header gives its KEYS, ARGV and reply)."""

from __future__ import annotations

from ..core.store import Lua

DEREGISTER = Lua(__package__, "deregister")
FETCH = Lua(__package__, "fetch")
HEARTBEAT = Lua(__package__, "heartbeat")
LEADER = Lua(__package__, "leader")
LEDGER_END = Lua(__package__, "ledger_end")
LEDGER_START = Lua(__package__, "ledger_start")
REAPER_CLAIM = Lua(__package__, "reaper_claim")
REAPER_EPOCH = Lua(__package__, "reaper_epoch")
REAPER_RECLAIM = Lua(__package__, "reaper_reclaim")
