-- Record an authenticated poll: the cluster's last poll, and the polling agent's report of
-- itself (kept per instance for an hour, the newest 200 per cluster; an agent too old to report
-- is kept under the instance '' with an empty report). Returns Redis time (ms).
-- KEYS: heartbeat, agents (instance -> last seen ms), reports (instance -> JSON)
-- ARGV: cluster, instance, report JSON ('' for none), keep ms, most instances
local keep = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], now)
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep)
local excess = redis.call('ZCARD', KEYS[2]) - #gone - tonumber(ARGV[5])
if excess > 0 then
  for _, instance in ipairs(redis.call('ZRANGE', KEYS[2], #gone, #gone + excess - 1)) do
    table.insert(gone, instance)
  end
end
for _, instance in ipairs(gone) do
  redis.call('ZREM', KEYS[2], instance)
  redis.call('HDEL', KEYS[3], instance)
end
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('PEXPIRE', KEYS[3], keep)
return now
