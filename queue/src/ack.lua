-- Acknowledge one lease: the transfer to the cluster succeeded.
-- 'acked', or 'stale' when the token is not the current lease's (a newer delivery exists,
-- the lease lapsed and was reclaimed, or it was acknowledged already).
-- KEYS: leased, jobs, meta, where, acked
-- ARGV: id, token
local id = ARGV[1]
local raw = redis.call('HGET', KEYS[3], id)
if not raw or not redis.call('ZSCORE', KEYS[1], id) then return 'stale' end
local m = cjson.decode(raw)
if m.token ~= ARGV[2] then return 'stale' end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
redis.call('HDEL', KEYS[4], id)
redis.call('ZADD', KEYS[5], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 7 * 24 * 3600 * 1000)
return 'acked'
