-- The process executor's launch markers.
-- Records a stop request for a build of `host` that has not ended. KEYS: launches, stop.
-- ARGV: id, host. Returns the marker, or nil when there is nothing to stop.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return false end
local m = cjson.decode(cur)
if m.state == 'ended' or m.host ~= ARGV[2] then return false end
redis.call('SADD', KEYS[2], ARGV[1])
return cur
