-- Saves a reported entry's progress, or drops it as done. Changes nothing when the pending
-- entry is no longer this status (an end superseded it).
-- KEYS: events, due, done
-- ARGV: build id, status, entry JSON (empty: reported, drop the entry and remember it as done),
--       retry delay ms (empty: keep the claim)
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or cjson.decode(current).status ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1]) end
  return 1
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1] .. ':' .. ARGV[2])
return 1
