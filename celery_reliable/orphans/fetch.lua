-- Reliable fetch: pop one message from the first non-empty queue key and record it as
-- delivered to this worker, in one step (kombu's BRPOP pops first and records later, so a
-- kill -9 in between lost the message).
--
-- KEYS[1]    unacked        HASH  kombu's: delivery tag -> [payload, exchange, routing key]
-- KEYS[2]    unacked_index  ZSET  kombu's: delivery tag -> delivery time
-- KEYS[3]    fetch record   HASH  this worker's: delivery tag -> JSON {t, id, task, q, r?}
--            (r = 1 when kombu restored the message before: delivery_info.redelivered)
-- KEYS[4..]  queue keys to try, in order (queues x priority steps, as kombu's BRPOP)
-- ARGV[i]    the queue name of KEYS[3 + i]
--
-- Returns nil when every queue key is empty, else {i, payload, recorded}: i is the
-- position of the popped key among KEYS[4..] (1-based); recorded is 0 when the payload is
-- not a kombu message with a delivery tag (returned untouched, as BRPOP would), else 1.
-- The time (Redis clock) is both the unacked_index score and the record's t, same string.
local item, n
for i = 4, #KEYS do
  item = redis.call('RPOP', KEYS[i])
  if item then n = i - 3 break end
end
if not item then return nil end
local ok, msg = pcall(cjson.decode, item)
if not ok or type(msg) ~= 'table' or type(msg.properties) ~= 'table' then
  return {n, item, 0}
end
local props = msg.properties
local tag = props.delivery_tag
if type(tag) ~= 'string' or tag == '' then return {n, item, 0} end
local info = type(props.delivery_info) == 'table' and props.delivery_info or {}
local headers = type(msg.headers) == 'table' and msg.headers or {}
local function text(v) if type(v) == 'string' then return v end return nil end
local function json(v) if type(v) == 'string' then return cjson.encode(v) end return 'null' end
local t = redis.call('TIME')
local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
-- kombu's entry, with the payload verbatim (decoding and re-encoding could change it)
redis.call('HSET', KEYS[1], tag,
  '[' .. item .. ',' .. json(info.exchange) .. ',' .. json(info.routing_key) .. ']')
redis.call('ZADD', KEYS[2], now, tag)
local r = nil
if info.redelivered == true then r = 1 end
redis.call('HSET', KEYS[3], tag, cjson.encode({
  t = now, id = text(headers.id), task = text(headers.task), q = ARGV[n], r = r}))
return {n, item, 1}
