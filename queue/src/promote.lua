-- Move deferred messages back to ready now (their blocker finished) and ring the doorbell.
-- Returns how many moved.
-- KEYS: delayed, ready, meta
-- ARGV: doorbell channel, cluster, ids…
local moved = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    local raw = redis.call('HGET', KEYS[3], id)
    if raw then
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZADD', KEYS[2], cjson.decode(raw).score, id)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return moved
