-- Ordering, cancel: sequence ARGV[1] will never run (revoked or expired task).
-- KEYS[1] state hash, KEYS[2] parked hash (see ord_start.lua)
-- ARGV[1] seq, ARGV[2] '1' to release the key even if its holder's lease is alive (the
--         worker terminated the running holder), ARGV[3] ttl in ms
-- Returns {'passed'} | {'later'} (skipped when its turn comes) | {'held'} (a live holder
-- runs this seq and will advance the key) | {'ok'} | {'next', json} (re-publish it).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local seq = tonumber(ARGV[1])
local s = redis.call('HMGET', KEYS[1], 'next', 'tok', 'lease')
local nxt = tonumber(s[1]) or 1
if seq < nxt then return {'passed'} end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[2], seq)
redis.call('HDEL', KEYS[1], 'd' .. seq)
if seq > nxt then
  redis.call('HSET', KEYS[1], 'c' .. seq, 1)
  return {'later'}
end
if (tonumber(s[2]) or 0) ~= 0 and (tonumber(s[3]) or 0) > now and ARGV[2] ~= '1' then
  return {'held'}
end
seq = seq + 1
while redis.call('HDEL', KEYS[1], 'c' .. seq) == 1 do
  redis.call('HDEL', KEYS[2], seq)
  seq = seq + 1
end
redis.call('HSET', KEYS[1], 'next', seq, 'tok', 0)
redis.call('HDEL', KEYS[1], 'wait', 'retry')
local p = redis.call('HGET', KEYS[2], seq)
if p then
  redis.call('HSET', KEYS[1], 'hand', now)
  return {'next', p}
end
return {'ok'}
