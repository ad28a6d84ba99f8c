-- Take a build off a cluster's queue if no agent holds it yet.
--   'removed'  it was waiting (ready or delayed) and is gone
--   'leased'   an agent holds a lease on it: the caller queues a stop message instead
--   'absent'   not on this queue
-- KEYS: ready, delayed, leased, jobs, meta, where
-- ARGV: id
local id = ARGV[1]
if redis.call('ZSCORE', KEYS[3], id) then
  return 'leased'
end
local removed = redis.call('ZREM', KEYS[1], id) + redis.call('ZREM', KEYS[2], id)
if removed == 0 and redis.call('HEXISTS', KEYS[4], id) == 0 then
  return 'absent'
end
redis.call('HDEL', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
redis.call('HDEL', KEYS[6], id)
return 'removed'
