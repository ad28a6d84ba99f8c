-- Extend a lease still held. 'renewed' or 'stale'.
-- KEYS: leased, meta
-- ARGV: id, token, visibility ms
local id = ARGV[1]
local raw = redis.call('HGET', KEYS[2], id)
if not raw or not redis.call('ZSCORE', KEYS[1], id) then return 'stale' end
if cjson.decode(raw).token ~= ARGV[2] then return 'stale' end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), id)
return 'renewed'
