-- Ordering, drop an idle key from the sweep index unless it was touched since it was read.
-- KEYS[1] the index sorted set ({ord}:keys); ARGV[1] member, ARGV[2] score seen
-- Returns 1 when removed.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
