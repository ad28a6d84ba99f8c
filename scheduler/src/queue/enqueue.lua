-- Put a build on a cluster's master queue. Idempotent and exclusive:
--   {1, cluster}  queued now
--   {0, cluster}  already queued on this cluster (no-op)
--   {-1, other}   queued on another cluster: refused, a build is never in two queues
--   {-2, ''}      already delivered and acknowledged: refused (tombstone)
-- KEYS: ready, jobs, meta, wake, acked, where
-- ARGV: id, message JSON, priority, jobId, cluster
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[5], id) then
  return {-2, ''}
end
local owner = redis.call('HGET', KEYS[6], id)
if owner then
  if owner == ARGV[5] then return {0, owner} end
  return {-1, owner}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = tonumber(ARGV[3]) * 1e13 + now
redis.call('HSET', KEYS[2], id, ARGV[2])
redis.call('HSET', KEYS[3], id, cjson.encode({score = score, deliveries = 0, jobId = ARGV[4], enqueuedAt = now}))
redis.call('ZADD', KEYS[1], score, id)
redis.call('HSET', KEYS[6], id, ARGV[5])
redis.call('RPUSH', KEYS[4], id)
redis.call('LTRIM', KEYS[4], -64, -1)
return {1, ARGV[5]}
