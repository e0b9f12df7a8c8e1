-- Leader election for the embedded reaper: take or keep a lease, or give it up.
--
-- KEYS[1] leader STRING (value: the holder's worker id; expires with the lease)
-- ARGV[1] candidate worker id, ARGV[2] lease in milliseconds (0: release if held)
--
-- Returns 1 when the candidate holds the lease after the call, else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
