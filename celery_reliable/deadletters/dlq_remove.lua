-- Remove dead letters by id.
--
-- KEYS[1] entries HASH, KEYS[2] index ZSET, KEYS[3] tasks HASH
-- ARGV    ids to remove
--
-- Returns the number of entries that existed and were removed.
local removed = 0
for _, id in ipairs(ARGV) do
  removed = removed + redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
end
return removed
