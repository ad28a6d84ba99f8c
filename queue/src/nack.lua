-- Give a lease back: the message returns after a back-off that doubles per delivery.
-- 'nacked' or 'stale'. The job no longer counts as running (nothing runs it now).
-- KEYS: leased, delayed, meta, running
-- ARGV: id, token, base back-off ms, max back-off ms
local id = ARGV[1]
local raw = redis.call('HGET', KEYS[3], id)
if not raw or not redis.call('ZSCORE', KEYS[1], id) then return 'stale' end
local m = cjson.decode(raw)
if m.token ~= ARGV[2] then return 'stale' end
local backoff = math.min(tonumber(ARGV[3]) * 2 ^ math.max(m.deliveries - 1, 0), tonumber(ARGV[4]))
m.token = ''
redis.call('HSET', KEYS[3], id, cjson.encode(m))
redis.call('ZREM', KEYS[1], id)
redis.call('ZADD', KEYS[2], now + backoff, id)
if m.jobId ~= '' and redis.call('HGET', KEYS[4], m.jobId) == id then
  redis.call('HDEL', KEYS[4], m.jobId)
end
return 'nacked'
