-- Ordering, sweep of one key: redo lost hand-offs, skip gaps that outlived the timeout.
-- KEYS[1] state hash, KEYS[2] parked hash (see ord_start.lua)
-- ARGV[1] gap timeout in ms, ARGV[2] hand-off timeout in ms
-- Returns {'busy'} (a live holder) | {'idle'} (nothing waits) | {'pending'} |
-- {'republish', json} (the task whose turn it is is parked and nobody started it) |
-- {'skipped', seq, json or ''} (seq never came: the key moved on; re-publish json)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local s = redis.call('HMGET', KEYS[1], 'next', 'tok', 'lease', 'wait', 'retry', 'hand')
local nxt = tonumber(s[1]) or 1
local tok, lease = tonumber(s[2]) or 0, tonumber(s[3]) or 0
if tok ~= 0 and lease > now then return {'busy'} end
local p = redis.call('HGET', KEYS[2], nxt)
if p then
  if now - (tonumber(s[6]) or 0) < tonumber(ARGV[2]) then return {'pending'} end
  redis.call('HSET', KEYS[1], 'hand', now)
  return {'republish', p}
end
if redis.call('HLEN', KEYS[2]) == 0 then return {'idle'} end
local due = math.max(tonumber(s[5]) or 0,
  (tonumber(redis.call('HGET', KEYS[1], 'd' .. nxt)) or 0) + tonumber(ARGV[1]))
if due > now then return {'pending'} end
-- successors are parked but seq nxt is missing (never published, or its holder died
-- and was not redelivered): count the wait from the lease's end or first sight
local since = tonumber(s[4])
if tok ~= 0 then since = lease end
if not since then
  redis.call('HSET', KEYS[1], 'wait', now)
  return {'pending'}
end
if now - since < tonumber(ARGV[1]) then return {'pending'} end
local skipped = nxt
redis.call('HSET', KEYS[1], 's' .. nxt, now)
redis.call('HDEL', KEYS[1], 'd' .. nxt)
nxt = nxt + 1
while redis.call('HDEL', KEYS[1], 'c' .. nxt) == 1 do
  redis.call('HDEL', KEYS[2], nxt)
  nxt = nxt + 1
end
redis.call('HSET', KEYS[1], 'next', nxt, 'tok', 0)
redis.call('HDEL', KEYS[1], 'wait', 'retry')
local q = redis.call('HGET', KEYS[2], nxt)
if q then redis.call('HSET', KEYS[1], 'hand', now) else q = '' end
return {'skipped', skipped, q}
