-- Remove dead letters by id.
--
-- KEYS[1] entries HASH, KEYS[2] index ZSET, KEYS[3] tasks HASH
-- KEYS[4] kinds HASH, KEYS[5] counts HASH (see dlq_add.lua)
-- ARGV    ids to remove
--
-- Returns the number of entries that existed and were removed.
local removed = 0
for _, id in ipairs(ARGV) do
  removed = removed + redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  local kind = redis.call('HGET', KEYS[4], id)
  if kind then
    redis.call('HDEL', KEYS[4], id)
    local cut = string.find(kind, '\n', 1, true)
    for _, field in ipairs({'r:' .. string.sub(kind, 1, cut - 1), 'e:' .. string.sub(kind, cut + 1)}) do
      if redis.call('HINCRBY', KEYS[5], field, -1) <= 0 then redis.call('HDEL', KEYS[5], field) end
    end
  end
end
return removed
