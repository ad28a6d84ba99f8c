-- The agent's build event outbox: keeps a build's event until it is reported, once per build
-- and status. An end supersedes a pending `running`; the first end recorded wins; an event
-- already reported (or any event after a reported end) is not kept again.
-- KEYS: events (HASH buildId → entry JSON with .status), due (ZSET), done (ZSET buildId:status → ms)
-- ARGV: build id, status, entry JSON, done retention ms
-- Returns 1 recorded, 2 already pending, 0 already reported.
local id, status = ARGV[1], ARGV[2]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
if redis.call('ZSCORE', KEYS[3], id .. ':' .. status) then return 0 end
local ended = redis.call('ZSCORE', KEYS[3], id .. ':finished') or redis.call('ZSCORE', KEYS[3], id .. ':failed')
  or redis.call('ZSCORE', KEYS[3], id .. ':stopped')
if ended then return 0 end
local current = redis.call('HGET', KEYS[1], id)
if current then
  local pending = cjson.decode(current).status
  if pending == status or pending ~= 'running' or status == 'running' then return 2 end
end
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('ZADD', KEYS[2], now, id)
return 1
