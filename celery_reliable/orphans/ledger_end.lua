-- A ReliableTask ended: take it out of its worker's in-flight ledger.
--
-- KEYS[1] ledger HASH, KEYS[2] recoveries STRING (this task id), KEYS[3] stats HASH
-- ARGV[1] task id, ARGV[2] 1 when the task ended for good (forget its recovery count,
-- unless a reaper took the entry: then the recovered copy still counts)
-- ARGV[3] 1 to count a missing entry in stats (0: the worker's ack guard counts it)
--
-- Returns 1 when the entry was there; 0 when a reaper had taken it (this worker was
-- declared dead while the task ran, so the task was recovered and may have run twice:
-- counted in stats as 'duplicates').
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 0 then
  -- the recovered copy may still be running elsewhere: keep its recovery count
  if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[3], 'duplicates', 1) end
elseif ARGV[2] == '1' then
  redis.call('DEL', KEYS[2])
end
return removed
