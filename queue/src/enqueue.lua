-- Put a message on a cluster's master queue. Idempotent and exclusive:
--   {1, cluster}  queued now
--   {0, cluster}  already queued on this cluster (no-op)
--   {-1, other}   queued on another cluster: refused, a message is never in two queues
--   {-2, ''}      already delivered and acknowledged: refused (tombstone), unless forced
-- A dead letter of this cluster queued again (an operator's requeue, or the reconciler after a
-- crash between dead-lettering and recording it) leaves the dead set: it waits again.
-- KEYS: ready, jobs, meta, acked, where, newest, dead
-- ARGV: id, message JSON, priority, jobId ('' for stops), cluster, blockers JSON array,
--       collapse ('1'/'0'), same-job wait ms, force ('1' clears the tombstone first),
--       doorbell channel
-- A forced enqueue puts back a build this cluster's agent acknowledged before: the agent may
-- still hold it in its own queue, so the message is pinned to this cluster (`move` leaves it).
local id = ARGV[1]
if ARGV[9] == '1' then
  redis.call('ZREM', KEYS[4], id)
elseif redis.call('ZSCORE', KEYS[4], id) then
  return {-2, ''}
end
local owner = redis.call('HGET', KEYS[5], id)
if owner then
  if owner == ARGV[5] then return {0, owner} end
  return {-1, owner}
end
local score = tonumber(ARGV[3]) * 1e13 + now
redis.call('HSET', KEYS[2], id, ARGV[2])
redis.call('HSET', KEYS[3], id, cjson.encode({
  buildId = id, jobId = ARGV[4], score = score, deliveries = 0, enqueuedAt = now, token = '',
  blockers = cjson.decode(ARGV[6]), collapse = ARGV[7] == '1', sameJobWaitMs = tonumber(ARGV[8]),
  blockedReported = false, pinned = ARGV[9] == '1',
}))
redis.call('ZADD', KEYS[1], score, id)
redis.call('ZREM', KEYS[7], id)
redis.call('HSET', KEYS[5], id, ARGV[5])
if ARGV[4] ~= '' then
  local newest = tonumber(redis.call('HGET', KEYS[6], ARGV[4]) or '0')
  local mine = tonumber(id)
  if mine and mine > newest then redis.call('HSET', KEYS[6], ARGV[4], id) end
end
redis.call('PUBLISH', ARGV[10], ARGV[5])
return {1, ARGV[5]}
