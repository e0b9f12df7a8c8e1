-- Claim one dead worker, atomically, so that concurrent reapers never recover twice.
--
-- KEYS[1] workers ZSET, KEYS[2] info HASH, KEYS[3] ledger HASH, KEYS[4] held HASH
-- KEYS[5] claimed ledger, KEYS[6] claimed held, KEYS[7] claims ZSET (worker id -> time)
-- KEYS[8] reaped marker STRING (tells a worker that was only paused what happened)
-- ARGV[1] worker id, ARGV[2] worker timeout (s), ARGV[3] marker ttl (s)
-- ARGV[4] (optional) a time (Redis clock) at which the worker's store connection was seen
--         gone: then the worker is dead unless it heartbeated since, whatever the timeout
--
-- Returns {} when the worker is alive again or another reaper claimed it, else
-- {last heartbeat, info JSON or '', seconds silent}.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[4] and ARGV[4] ~= '' then
  if tonumber(score) >= tonumber(ARGV[4]) then return {} end
elseif now - tonumber(score) <= tonumber(ARGV[2]) then
  return {}
end
local info = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
-- Move ledger and held tags to the claimed keys, merging with an unfinished earlier claim.
for i = 3, 4 do
  if redis.call('EXISTS', KEYS[i + 2]) == 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 2]) end
  else
    local entries = redis.call('HGETALL', KEYS[i])
    for j = 1, #entries, 2 do redis.call('HSET', KEYS[i + 2], entries[j], entries[j + 1]) end
    redis.call('DEL', KEYS[i])
  end
end
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('SET', KEYS[8], tostring(now), 'EX', tonumber(ARGV[3]))
return {tostring(score), info, tostring(now - tonumber(score))}
