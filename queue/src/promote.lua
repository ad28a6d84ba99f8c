-- Move deferred messages back to ready now (their blocker finished) and ring the doorbell.
-- Returns how many moved.
-- KEYS: delayed, ready, meta, wake
-- ARGV: ids…
local moved = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[1], id) then
    local raw = redis.call('HGET', KEYS[3], id)
    if raw then
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', KEYS[2], cjson.decode(raw).score, id)
      redis.call('RPUSH', KEYS[4], id)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('LTRIM', KEYS[4], -64, -1) end
return moved
