-- Keeps the holders' record current and takes back the leases of dead instances: those that
-- stopped beating, and those named as dead already. In one pass over the record: an entry whose
-- lease is gone (settled) is dropped; a lease held by a dead instance lapses now, so the next
-- fetch of any live instance returns it to ready (fencing tokens keep the dead holder's late
-- settle stale). Forgets the dead instances; rings the doorbell when something was taken back.
-- Returns how many leases were taken back.
-- KEYS: instances, holders, leased
-- ARGV: lapse ms (silence after which an instance is dead; empty: none is judged by silence),
--       doorbell channel, cluster, then any instances known to be dead (a restarted agent's
--       previous run, which its instance file's lock proves dead)
local dead = {}
if ARGV[1] ~= '' then
  dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
end
for i = 4, #ARGV do dead[#dead + 1] = ARGV[i] end
local gone = {}
for _, instance in ipairs(dead) do gone[instance] = true end
local held = redis.call('HGETALL', KEYS[2])
local reclaimed = 0
for i = 1, #held, 2 do
  local id, holder = held[i], held[i + 1]
  if not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('HDEL', KEYS[2], id)
  elseif gone[holder] then
    redis.call('ZADD', KEYS[3], now, id)
    redis.call('HDEL', KEYS[2], id)
    reclaimed = reclaimed + 1
  end
end
for _, instance in ipairs(dead) do redis.call('ZREM', KEYS[1], instance) end
if reclaimed > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return reclaimed
