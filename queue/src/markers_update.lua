-- The process executor's launch markers.
-- Replaces a marker while `instance` owns it and it has not ended; an ending marker leaves the
-- active set, is indexed for pruning, and markers past retention are pruned (bounded work).
-- KEYS: launches, active, ended, stop. ARGV: id, instance, marker, ended_at ('' unless ending),
-- prune_before. Returns -1 when not applied, else 1 when a stop was requested, 0 otherwise.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return -1 end
local m = cjson.decode(cur)
if m.state == 'ended' or type(m.agent) ~= 'table' or m.agent.instance ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
local stop = redis.call('SISMEMBER', KEYS[4], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[5], 'LIMIT', 0, 100)
  for _, old_id in ipairs(old) do
    redis.call('HDEL', KEYS[1], old_id)
    redis.call('ZREM', KEYS[3], old_id)
  end
end
return stop
