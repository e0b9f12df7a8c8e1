"""The Lua scripts of this feature (each file's header gives its KEYS, ARGV and reply)."""

from __future__ import annotations

from ..core.store import Lua

ORD_CANCEL = Lua(__package__, "ord_cancel")
ORD_END = Lua(__package__, "ord_end")
ORD_INDEX = Lua(__package__, "ord_index")
ORD_PUBLISH = Lua(__package__, "ord_publish")
ORD_RENEW = Lua(__package__, "ord_renew")
ORD_START = Lua(__package__, "ord_start")
ORD_SWEEP = Lua(__package__, "ord_sweep")
ORD_UNINDEX = Lua(__package__, "ord_unindex")
