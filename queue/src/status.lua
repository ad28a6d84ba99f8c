-- A cluster's queue as an operator sees it, in one consistent read:
--   {ready, leased, deferred, blocked, dead, oldest id, oldest enqueued at (ms, -1 for none),
--    scanned every waiting message (1/0), dispatched in the last 60 minutes, now (ms),
--    agents: flat {instance, last seen ms, report JSON, ...} newest first,
--    the cluster's last poll (ms, -1 for never),
--    the last 60 minutes oldest first: flat {dispatched, waiting (-1 when no fetch ran), ...}}
-- Blocked messages are the deferred ones held back by a running build of a job they are
-- blocked by (their own job's included); the rest of the deferred set backs off after a nack. The oldest waiting
-- message is looked for among the first ARGV[1] ready and deferred ones (enqueue order is not
-- the ready set's order: priorities come first).
-- KEYS: ready, leased, delayed, meta, dead, agents, reports, dispatched, running, heartbeat
-- ARGV: most messages scanned per set, agents seen within (ms), cluster
local cap = tonumber(ARGV[1])
local ready, leased = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
local delayed, dead = redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[5])
local blocked, oldest_id, oldest_at = 0, '', -1
local complete = 1
for _, set in ipairs({KEYS[1], KEYS[3]}) do
  local ids = redis.call('ZRANGE', set, 0, cap - 1)
  if redis.call('ZCARD', set) > cap then complete = 0 end
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KEYS[4], id)
    if raw then
      local m = cjson.decode(raw)
      if oldest_at < 0 or m.enqueuedAt < oldest_at then
        oldest_at, oldest_id = m.enqueuedAt, id
      end
      if set == KEYS[3] then
        for _, job in ipairs(m.blockers or {}) do
          local holder = redis.call('HGET', KEYS[9], tostring(job))
          if holder and holder ~= id then
            blocked = blocked + 1
            break
          end
        end
      end
    end
  end
end
local minute = math.floor(now / 60000)
local dispatched = 0
local per_minute = {}
for _, entry in ipairs(redis.call('HVALS', KEYS[8])) do
  local at, count, waiting = string.match(entry, '^(%d+):(%d+):?(%d*)$')
  at = tonumber(at)
  if at and at > minute - 60 and at <= minute then
    dispatched = dispatched + tonumber(count)
    per_minute[at] = {tonumber(count), tonumber(waiting) or -1}
  end
end
local last_hour = {}
for m = minute - 59, minute do
  local figures = per_minute[m] or {0, -1}
  table.insert(last_hour, figures[1])
  table.insert(last_hour, figures[2])
end
local agents = {}
local seen = redis.call('ZREVRANGEBYSCORE', KEYS[6], '+inf', now - tonumber(ARGV[2]), 'WITHSCORES')
for i = 1, #seen, 2 do
  table.insert(agents, seen[i])
  table.insert(agents, seen[i + 1])
  table.insert(agents, redis.call('HGET', KEYS[7], seen[i]) or '')
end
return {ready, leased, delayed - blocked, blocked, dead, oldest_id, oldest_at, complete,
  dispatched, now, agents, tonumber(redis.call('HGET', KEYS[10], ARGV[3]) or '-1'), last_hour}
