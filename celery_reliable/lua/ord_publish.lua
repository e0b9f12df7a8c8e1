-- Ordering, publish: take the next place in line of one (group, key).
-- KEYS[1] state hash of the key ({ord:<group>:<key>}:state)
-- ARGV[1] time to live of the key's state, in ms (refreshed on every use)
-- Returns the sequence number (1, 2, 3...) the published task must carry.
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return seq
