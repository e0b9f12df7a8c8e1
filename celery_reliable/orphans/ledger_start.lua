-- A ReliableTask starts: record it in its worker's in-flight ledger.
--
-- KEYS[1] ledger      HASH  task id -> JSON {tag, task, exchange, routing_key, t, pid}
-- KEYS[2] workers     ZSET  worker id -> last heartbeat
-- KEYS[3] recoveries  STRING how many times a reaper recovered this task id
-- ARGV[1] worker id, ARGV[2] task id, ARGV[3] entry JSON
--
-- A task starting proves its worker alive: if a reaper removed the registration (the
-- worker was paused past the timeout), it is put back so this entry stays reapable.
-- Returns the task's recovery count.
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
end
return tonumber(redis.call('GET', KEYS[3]) or '0')
