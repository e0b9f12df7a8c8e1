-- Ordering, end: the holder with fencing token ARGV[2] ends its run of sequence ARGV[1].
-- KEYS[1] state hash (see ord_start.lua; c<seq> marks a seq cancelled before its turn)
-- KEYS[2] parked hash
-- ARGV[1] seq, ARGV[2] token, ARGV[3] 'done' (advance the key) or 'again' (the same task
--         comes back: a retry, a requeue), ARGV[4] ms to wait for it before a gap counts
-- Returns {'fenced'} (the key was taken over: change nothing) | {'ok'} | {'next', json}
-- (the parked task whose turn it now is: the caller re-publishes it; it stays parked
-- until it starts, so a lost hand-off is redone by ord_sweep.lua).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local seq = tonumber(ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'tok') or '0') ~= tonumber(ARGV[2]) then
  return {'fenced'}
end
redis.call('HSET', KEYS[1], 'tok', 0)
if ARGV[3] == 'again' then
  redis.call('HSET', KEYS[1], 'retry', now + tonumber(ARGV[4]))
else
  redis.call('HDEL', KEYS[2], seq)
  seq = seq + 1
  while redis.call('HDEL', KEYS[1], 'c' .. seq) == 1 do
    redis.call('HDEL', KEYS[2], seq)
    seq = seq + 1
  end
  redis.call('HSET', KEYS[1], 'next', seq)
  redis.call('HDEL', KEYS[1], 'wait', 'retry')
end
local p = redis.call('HGET', KEYS[2], seq)
if p then
  redis.call('HSET', KEYS[1], 'hand', now)
  return {'next', p}
end
return {'ok'}
