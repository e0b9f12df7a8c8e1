"""Several scripts, one round trip: the start (or the end) of a task as one EVALSHA.

Each feature of a ReliableTask keeps its own Lua script (``ord_start.lua``, ``admit.lua``,
``ledger_start.lua``...) with its own keys. A task using several features would pay one
round trip per script; :func:`run_chain` runs a list of :class:`ScriptCall` as ONE script
instead, generated from the scripts' own sources: each becomes a local function of the
chain, called with its own slice of KEYS and ARGV, in order. A call marked ``gate`` ends
the chain unless its reply is a table starting with ``'run'``: a task that ordering parks
spends no rate-limit token and writes no ledger entry, as if the scripts had been called
one by one by a caller that stops at the first "no".

Every key is still passed in (none is built in Lua). The steps' keys live in different
hash slots, so on Redis Cluster (where one script stays in one slot) the calls run one by
one, with the same gating.

Examples:
    >>> replies = run_chain(store, [
    ...     ScriptCall(ORD_START, ord_keys, ord_args, gate=True),
    ...     ScriptCall(LEDGER_START, ledger_keys, ledger_args),
    ... ])
    >>> replies[1] is NOT_RUN          # ordering parked the task: no ledger entry
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from .extensions import LuaSource, ScriptCall
from .store import Lua, RedisStore

__all__ = ["NOT_RUN", "Chain", "ScriptCall", "folds", "passes", "run_chain"]


class _NotRun:
    """The type of :data:`NOT_RUN`."""

    def __repr__(self) -> str:
        return "NOT_RUN"

    def __bool__(self) -> bool:
        return False


#: The reply in place of a call that did not run because an earlier gate said no.
NOT_RUN: Any = _NotRun()

#: The chain's own code, after the step functions. ARGV[1] = the number of steps n;
#: ARGV[2 .. 1+3n] = for each step: its number of keys, its number of args, '1' when it
#: gates; then every step's args, in order. KEYS = every step's keys, in order.
#: Returns one reply per step that ran (a nil reply comes back as false).
_DISPATCH = """
local n = tonumber(ARGV[1])
local ki, ai = 1, 2 + 3 * n
local out = {}
for i = 1, n do
  local h = 2 + 3 * (i - 1)
  local nk, na = tonumber(ARGV[h]), tonumber(ARGV[h + 1])
  local k, a = {}, {}
  for j = 1, nk do k[j] = KEYS[ki + j - 1] end
  for j = 1, na do a[j] = ARGV[ai + j - 1] end
  ki, ai = ki + nk, ai + na
  local r = STEPS[i](k, a)
  if r == nil then r = false end
  out[i] = r
  if ARGV[h + 2] == '1' and not (type(r) == 'table' and r[1] == 'run') then break end
end
return out
"""


@dataclass(frozen=True)
class Chain(Lua):
    """The generated script that runs ``steps`` in order (cached by the store like any
    other script: one SCRIPT LOAD per combination of steps and server)."""

    steps: tuple[LuaSource, ...] = ()

    def source(self) -> str:
        parts = [f"-- chain of {', '.join(s.name for s in self.steps)} (core/chain.py)"]
        for i, step in enumerate(self.steps, 1):
            parts.append(f"local function step{i}(KEYS, ARGV)\n{step.source()}\nend")
        names = ", ".join(f"step{i}" for i in range(1, len(self.steps) + 1))
        parts.append(f"local STEPS = {{{names}}}")
        parts.append(_DISPATCH)
        return "\n".join(parts)


def passes(reply: Any) -> bool:
    """Whether a gating step's reply lets the chain go on (``['run', ...]``)."""
    return isinstance(reply, list) and bool(reply) and reply[0] == "run"


def folds(store: RedisStore) -> bool:
    """False on Redis Cluster, where one script cannot span the steps' hash slots."""
    return not isinstance(store.client, redis.cluster.RedisCluster)


def run_chain(store: RedisStore, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run ``calls`` in order, in one round trip; one reply per call, :data:`NOT_RUN` for
    those after a gate that said no.

    Raises:
        redis.RedisError: the chain could not run, or a step's script raised (after the
            steps before it made their writes: Redis does not roll a script back).
    """
    if len(calls) <= 1 or not folds(store):
        return _one_by_one(store, calls)
    chain = Chain(__package__ or "celery_reliable.core", "chain", tuple(c.lua for c in calls))
    keys: list[str] = []
    header: list[Any] = [len(calls)]
    args: list[Any] = []
    for call in calls:
        keys.extend(call.keys)
        args.extend(call.args)
        header.extend((len(call.keys), len(call.args), "1" if call.gate else "0"))
    replies = list(store.run(chain, keys, header + args))
    return replies + [NOT_RUN] * (len(calls) - len(replies))


def _one_by_one(store: RedisStore, calls: Sequence[ScriptCall]) -> list[Any]:
    replies: list[Any] = []
    for call in calls:
        reply = store.run(cast(Lua, call.lua), list(call.keys), list(call.args))
        replies.append(reply)
        if call.gate and not passes(reply):
            break
    return replies + [NOT_RUN] * (len(calls) - len(replies))
