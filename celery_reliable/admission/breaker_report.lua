-- breaker_report.lua: record how a run guarded by a breaker ended, and move its state.
-- KEYS[1]: the breaker hash (fields state, fails, opened_at, probe, probe_until)
-- KEYS[2]: the breaker index (ZSET breaker name -> last report, read by `reliable status`)
-- ARGV[1]: 'success' | 'failure' | 'release' (the run neither proved nor disproved health)
-- ARGV[2]: task id; ARGV[3]: fail_max; ARGV[4]: the breaker's name
-- Returns {state, fails, opened_at_us, transition ('' | 'open' | 'closed')}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local kind, id, k = ARGV[1], ARGV[2], KEYS[1]
redis.call('ZADD', KEYS[2], now, ARGV[4])
local b = redis.call('HMGET', k, 'state', 'probe', 'fails', 'opened_at')
local state, is_probe = b[1] or 'closed', b[2] == ARGV[2]
local fails, opened_at, trans = tonumber(b[3] or '0'), tonumber(b[4] or '0'), ''
if state == 'half-open' and is_probe then
  redis.call('HDEL', k, 'probe', 'probe_until')
  if kind == 'success' then
    redis.call('HSET', k, 'state', 'closed', 'fails', 0)
    state, fails, trans = 'closed', 0, 'closed'
  elseif kind == 'failure' then
    redis.call('HSET', k, 'state', 'open', 'opened_at', now)
    state, opened_at, trans = 'open', now, 'open'
  end
elseif state == 'closed' then
  if kind == 'success' and fails > 0 then
    redis.call('HSET', k, 'fails', 0)
    fails = 0
  elseif kind == 'failure' then
    fails = redis.call('HINCRBY', k, 'fails', 1)
    if fails >= tonumber(ARGV[3]) then
      redis.call('HSET', k, 'state', 'open', 'opened_at', now)
      state, opened_at, trans = 'open', now, 'open'
    end
  end
end
return {state, fails, opened_at, trans}
