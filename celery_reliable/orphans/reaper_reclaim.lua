-- Take over a claim whose reaper stopped before finishing it (crashed mid-pass).
--
-- KEYS[1] claims ZSET (worker id -> claim time)
-- ARGV[1] worker id, ARGV[2] lease (s): a claim older than this may be taken over
--
-- Returns 1 when this caller now owns the claim, else 0.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if now - tonumber(score) <= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
