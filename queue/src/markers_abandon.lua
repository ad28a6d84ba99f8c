-- The process executor's launch markers.
-- Deletes a marker whose spawn failed (nothing ran), while `instance` owns it and it is still
-- starting. KEYS: launches, active. ARGV: id, instance.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local m = cjson.decode(cur)
if m.state ~= 'starting' or type(m.agent) ~= 'table' or m.agent.instance ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
