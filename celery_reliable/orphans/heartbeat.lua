-- One worker heartbeat: refresh the registration and the delivery tags the worker holds.
--
-- KEYS[1] workers  ZSET  worker id -> last heartbeat (Redis time, Unix seconds)
-- KEYS[2] info     HASH  worker id -> JSON {node, hostname, pid, started_at, ...}
-- KEYS[3] held     HASH  delivery tag -> worker-clock time it was reported (this worker),
--                  with a '+' before it when the worker had handed it to its pool (still
--                  a number to float(): a reaper of an earlier release reads it as before)
-- KEYS[4] reaped   STRING set by a reaper that declared this worker dead
-- KEYS[5] epoch    STRING when this registry began (set here when missing: a store that
--                  lost its data starts a new generation, see reaper_epoch.lua)
-- ARGV[1] worker id, ARGV[2] info JSON, ARGV[3] report time (worker clock)
-- ARGV[4] 1 to replace the held tags with ARGV[5..], 0 to leave them alone
-- ARGV[5..] delivery tags held (prefetched or running); '+' before a tag: handed to the pool
--
-- Returns {was_reaped (0/1), now}. A reaped worker is registered again under the same id.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[5], tostring(now), 'NX')
local was_reaped = redis.call('DEL', KEYS[4])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[3])
  for i = 5, #ARGV do
    if string.sub(ARGV[i], 1, 1) == '+' then
      redis.call('HSET', KEYS[3], string.sub(ARGV[i], 2), '+' .. ARGV[3])
    else
      redis.call('HSET', KEYS[3], ARGV[i], ARGV[3])
    end
  end
end
return {was_reaped, tostring(now)}
