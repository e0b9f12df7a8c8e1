-- Ordering, lease renewal by the running holder (fenced).
-- KEYS[1] state hash; ARGV[1] the holder's token, ARGV[2] lease in ms
-- Returns 1 when renewed, 0 when the key was taken over (the token is stale).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if tonumber(redis.call('HGET', KEYS[1], 'tok') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
return 1
