-- The generation of the store's registry, read at the start of every reaper pass.
--
-- A store that lost its data (restarted without persistence, flushed, failed over to an
-- empty replica) has lost every registration and held-tag report too: until the live
-- workers have heartbeated again, the registry cannot tell a dead worker from a live one.
-- The epoch marker is created with the registry (by the first heartbeat or reaper pass),
-- so its age says how long the registry has been filling.
--
-- KEYS[1] epoch STRING: Redis time (Unix seconds) when this registry began
-- KEYS[2] workers ZSET: the registry (worker id -> last heartbeat)
--
-- Returns {epoch, now} as strings (Redis time). A missing epoch is set to now when the
-- registry is empty (new or lost), and to '0' when it has workers (it predates the marker).
local t = redis.call('TIME')
local now = tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000)
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  if redis.call('ZCARD', KEYS[2]) > 0 then epoch = '0' else epoch = now end
  redis.call('SET', KEYS[1], epoch)
end
return {epoch, now}
