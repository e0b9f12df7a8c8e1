-- admit.lua: may this task start now? Circuit breaker first, then the token bucket (GCRA).
-- One call per task start; nothing is written unless the answer is "run" or a reservation
-- (or the message is a deferred task's: then which message started is recorded too).
-- A bucket hash expires a minute after it is full again (an absent bucket is a full one).
-- KEYS[1]: the task's live-copy key (token of its newest deferred copy), KEYS[2] its
--   started-copy key (token of the newest message of the task admitted), then the bucket
--   hash (fields tat, sat, interval, burst) and the bucket index (ZSET bucket name -> last
--   use, read by `celery reliable status`) when ARGV[1]=='1', then the breaker hash
--   (fields state, fails, opened_at, probe, probe_until) when ARGV[5]=='1'.
-- ARGV: 1 has_bucket, 2 interval_us, 3 burst, 4 held slot_us (0: none), 5 has_breaker,
--   6 reset_timeout_us, 7 probe lease_us, 8 task id, 9 max reservation_us,
--   10 half-open recheck_us, 11 this message's copy token ('' for the first publish),
--   12 short wait_us (a bucket wait up to this long is slept by the caller, not deferred),
--   13 bucket name (its index member), 14 index horizon_us (buckets idle longer leave it)
-- Returns {verdict, wait_us, slot_us, breaker state, probe (0/1), fails, transition,
--   claimed}
--   ('run' with wait_us > 0: the start is booked; sleep that long, then start)
--   verdict: 'run' | 'bucket' | 'breaker' | 'stale' (a newer copy of the task exists: an
--   old message redelivered after a crash between deferring and acking, once that copy
--   has started); transition: '' or 'half-open'; claimed: 1 when this message is an older
--   one and the newest copy has not started (it may never have been published: a crash
--   between recording and publishing it), so this message runs and becomes the newest.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local has_bucket, has_breaker = ARGV[1] == '1', ARGV[5] == '1'
local rk, ik, bk = KEYS[3], KEYS[4], KEYS[#KEYS]
local state, probe, fails, trans, wait, claimed = 'closed', 0, 0, '', 0, 0
-- Deferred copies: whichever message of the task is admitted first after a deferral
-- owns the task; the others are stale. A deferral records its copy's token before it
-- publishes it, so a recorded copy may be missing (a crash in between): until that copy
-- is admitted, an older message is not dropped but takes its place.
local mine = ARGV[11] ~= '' and ARGV[11] or '-'
local live = redis.call('GET', KEYS[1])
if live and live ~= mine then
  if redis.call('GET', KEYS[2]) == live then return {'stale', 0, 0, state, 0, 0, '', 0} end
  claimed = 1
  redis.call('SET', KEYS[1], mine, 'KEEPTTL')
end
if live then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('SET', KEYS[2], mine, 'PX', math.max(ttl, 60000))
end
if has_breaker then
  local b = redis.call('HMGET', bk, 'state', 'opened_at', 'probe', 'probe_until', 'fails')
  state, fails = b[1] or 'closed', tonumber(b[5] or '0')
  if state == 'open' then
    local reopen = tonumber(b[2]) + tonumber(ARGV[6])
    if now < reopen then return {'breaker', reopen - now, 0, state, 0, fails, '', claimed} end
    probe, trans = 1, 'half-open'
  elseif state == 'half-open' then
    local lease_end = tonumber(b[4] or '0')
    if b[3] ~= ARGV[8] and lease_end > now then
      return {'breaker', math.min(lease_end - now, tonumber(ARGV[10])), 0, state, 0, fails, '',
        claimed}
    end
    probe = 1
  end
end
if has_bucket then
  -- tat: reservations (the order and time a task may start); sat: actual starts, so late
  -- copies cannot bunch up beyond the burst (any window W holds <= W/interval + burst).
  local interval, burst, held = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local h = redis.call('HMGET', rk, 'tat', 'sat')
  local tat, sat = math.max(tonumber(h[1] or '0'), now), math.max(tonumber(h[2] or '0'), now)
  if held == 0 then
    held = tat + interval - burst * interval
    if held - now > tonumber(ARGV[9]) then
      return {'bucket', tonumber(ARGV[9]), 0, state, 0, fails, '', claimed}
    end
    tat = tat + interval
    redis.call('HSET', rk, 'tat', tat, 'interval', interval, 'burst', burst)
  end
  redis.call('ZADD', ik, now, ARGV[13])
  redis.call('ZREMRANGEBYSCORE', ik, '-inf', now - tonumber(ARGV[14]))
  local start_at = math.max(held, sat + interval - burst * interval)
  if start_at - now > tonumber(ARGV[12]) then
    redis.call('PEXPIRE', rk, math.floor((math.max(tat, sat) - now) / 1000) + 60000)
    return {'bucket', start_at - now, held, state, 0, fails, '', claimed}
  end
  wait = math.max(start_at - now, 0)
  sat = math.max(sat, now + wait) + interval
  redis.call('HSET', rk, 'sat', sat)
  redis.call('PEXPIRE', rk, math.floor((math.max(tat, sat) - now) / 1000) + 60000)
end
if probe == 1 then
  redis.call('HSET', bk, 'state', 'half-open', 'probe', ARGV[8], 'probe_until', now + tonumber(ARGV[7]))
  state = 'half-open'
end
return {'run', wait, 0, state, probe, fails, trans, claimed}
