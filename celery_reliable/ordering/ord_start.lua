-- Ordering, start: may the task with sequence number ARGV[1] run now?
-- KEYS[1] state hash: next (whose turn), tok (fencing token of the running holder, 0 =
--         none), lease (ms deadline of the holder), fence (token counter), s<seq> (skipped),
--         d<seq> (when a delayed task is due)
-- KEYS[2] parked hash: seq -> JSON signature of a task that arrived before its turn
-- ARGV[1] seq, ARGV[2] lease in ms, ARGV[3] the task's JSON signature, ARGV[4] ttl in ms
-- Returns {'run', token} | {'park'} | {'stale', 1 if that seq was skipped else 0}
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local seq = tonumber(ARGV[1])
local s = redis.call('HMGET', KEYS[1], 'next', 'tok', 'lease')
local nxt = tonumber(s[1]) or 1
if seq < nxt then
  return {'stale', redis.call('HEXISTS', KEYS[1], 's' .. seq)}
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local tok = tonumber(s[2]) or 0
if seq > nxt or (tok ~= 0 and (tonumber(s[3]) or 0) > now) then
  -- not its turn, or a duplicate while the holder is alive: park it, atomically
  redis.call('HSET', KEYS[2], seq, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return {'park'}
end
-- its turn (or the holder's lease expired: take the key over with a new token)
local token = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'next', nxt, 'tok', token, 'lease', now + tonumber(ARGV[2]))
redis.call('HDEL', KEYS[1], 'wait', 'retry', 'hand', 'd' .. seq)
redis.call('HDEL', KEYS[2], seq)
return {'run', token}
