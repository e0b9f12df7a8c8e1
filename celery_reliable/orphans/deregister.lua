-- Remove a worker that is shutting down cleanly: registration, info, ledger, held tags.
--
-- KEYS[1] workers ZSET, KEYS[2] info HASH, KEYS[3] ledger HASH, KEYS[4] held HASH
-- ARGV[1] worker id
--
-- Returns the number of ledger entries that were still there (0 after a clean drain).
local left = redis.call('HLEN', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4])
return left
