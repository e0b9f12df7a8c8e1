-- Ordering, publish: take the next place in line of one (group, key).
-- KEYS[1] state hash of the key ({ord:<len(group)>:<group>:<key>}:state)
-- ARGV[1] time to live of the key's state, in ms (refreshed on every use)
-- ARGV[2] ms until the task is due (countdown/eta; 0 when none): until then, plus the
--         gap timeout, the sweep does not treat its number as missing
-- Returns the sequence number (1, 2, 3...) the published task must carry.
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local delay = tonumber(ARGV[2])
if delay > 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'd' .. seq, t[1] * 1000 + math.floor(t[2] / 1000) + delay)
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return seq
