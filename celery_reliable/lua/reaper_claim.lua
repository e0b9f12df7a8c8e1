-- Claim one dead worker, atomically, so that concurrent reapers never recover twice.
--
-- KEYS[1] workers ZSET, KEYS[2] info HASH, KEYS[3] ledger HASH, KEYS[4] held HASH
-- KEYS[5] claimed ledger, KEYS[6] claimed held, KEYS[7] claims ZSET (worker id -> time)
-- KEYS[8] reaped marker STRING (tells a worker that was only paused what happened)
-- ARGV[1] worker id, ARGV[2] worker timeout (s), ARGV[3] marker ttl (s)
--
-- Returns {} when the worker is alive again or another reaper claimed it, else
-- {last heartbeat, info JSON or '', seconds silent}.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if now - tonumber(score) <= tonumber(ARGV[2]) then return {} end
local info = redis.call('HGET', KEYS[2], ARGV[1]) or ''
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[5]) end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[6]) end
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('SET', KEYS[8], tostring(now), 'EX', tonumber(ARGV[3]))
return {tostring(score), info, tostring(now - tonumber(score))}
