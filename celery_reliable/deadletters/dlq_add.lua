-- Add one dead letter, idempotently, and enforce retention.
-- With an empty id (ARGV[1] == '') nothing is added: retention only (DeadLetterStore.trim).
--
-- KEYS[1] entries  HASH  id -> entry JSON
-- KEYS[2] index    ZSET  id scored by failed_at (Unix seconds)
-- KEYS[3] tasks    HASH  id -> task name (filtering without decoding entries)
-- KEYS[4] stats    HASH  added / expired / dropped counters
-- KEYS[5] kinds    HASH  id -> reason .. "\n" .. exception type (what `counts` counted)
-- KEYS[6] counts   HASH  "r:<reason>" / "e:<exception type>" -> entries stored now
-- ARGV[1] id, ARGV[2] entry JSON, ARGV[3] failed_at, ARGV[4] task name
-- ARGV[5] max entries, ARGV[6] ttl seconds, ARGV[7] most evictions per call
-- ARGV[8] reason, ARGV[9] exception type
--
-- Returns {added (0 when the id was already stored, or none given), expired now, dropped now}.
-- Eviction is bounded per call so one add never blocks Redis; the rest is trimmed
-- by later adds.
local added = 0
if ARGV[1] ~= '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
    return {0, 0, 0}
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('HINCRBY', KEYS[4], 'added', 1)
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[8] .. '\n' .. ARGV[9])
  redis.call('HINCRBY', KEYS[6], 'r:' .. ARGV[8], 1)
  redis.call('HINCRBY', KEYS[6], 'e:' .. ARGV[9], 1)
  added = 1
end

local budget = tonumber(ARGV[7])
-- forget one entry's kind; entries written before kinds existed were never counted
local function uncount(id)
  local kind = redis.call('HGET', KEYS[5], id)
  if not kind then return end
  redis.call('HDEL', KEYS[5], id)
  local cut = string.find(kind, '\n', 1, true)
  for _, field in ipairs({'r:' .. string.sub(kind, 1, cut - 1), 'e:' .. string.sub(kind, cut + 1)}) do
    if redis.call('HINCRBY', KEYS[6], field, -1) <= 0 then redis.call('HDEL', KEYS[6], field) end
  end
end
local function evict(ids, counter)
  for _, id in ipairs(ids) do
    uncount(id)
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[2], id)
  end
  if #ids > 0 then
    redis.call('HINCRBY', KEYS[4], counter, #ids)
  end
  budget = budget - #ids
  return #ids
end

local now = redis.call('TIME')
local cutoff = tonumber(now[1]) - tonumber(ARGV[6])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. cutoff, 'LIMIT', 0, budget)
local expired = evict(old, 'expired')

local dropped = 0
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if excess > 0 and budget > 0 then
  local popped = redis.call('ZRANGE', KEYS[2], 0, math.min(excess, budget) - 1)
  dropped = evict(popped, 'dropped')
end
return {added, expired, dropped}
