-- Takes back the leases of instances that stopped beating: each such lease lapses now, so the
-- next fetch of any live instance returns it to ready (fencing tokens keep the dead holder's
-- late acks stale). Forgets the dead instances and their holdings; rings the doorbell when
-- something was taken back. Returns how many leases.
-- KEYS: instances, holders, leased
-- ARGV: lapse ms (silence after which an instance is dead), doorbell channel, cluster
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
if #dead == 0 then return 0 end
local gone = {}
for _, instance in ipairs(dead) do gone[instance] = true end
local held = redis.call('HGETALL', KEYS[2])
local reclaimed = 0
for i = 1, #held, 2 do
  local id, holder = held[i], held[i + 1]
  if gone[holder] then
    if redis.call('ZSCORE', KEYS[3], id) then
      redis.call('ZADD', KEYS[3], now, id)
      reclaimed = reclaimed + 1
    end
    redis.call('HDEL', KEYS[2], id)
  end
end
for _, instance in ipairs(dead) do redis.call('ZREM', KEYS[1], instance) end
if reclaimed > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return reclaimed
