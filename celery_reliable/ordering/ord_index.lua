-- Ordering, start: note the key in the sweep's index (runs with ord_start.lua, before it).
-- KEYS[1] index ZSET: member JSON [group, key], score = ms of its last start
-- ARGV[1] member, ARGV[2] score (ms)
-- Returns 0 or 1 (ZADD's reply).
return redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
