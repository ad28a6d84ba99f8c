-- Claims up to ARGV[1] due items for ARGV[2] ms: each stays kept, due again when the lease
-- lapses, so a claimant that dies releases it by doing nothing. Fields whose item is gone are
-- dropped from the due set.
-- KEYS: items, due
-- ARGV: max, lease ms
-- Returns flat {field, body, ...}
local out = {}
for _, field in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local body = redis.call('HGET', KEYS[1], field)
  if body then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), field)
    out[#out + 1] = field
    out[#out + 1] = body
  else
    redis.call('ZREM', KEYS[2], field)
  end
end
return out
