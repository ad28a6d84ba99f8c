-- Lease up to ARGV[1] messages of one cluster. In one atomic step:
--   1. due delayed messages (blocked re-checks, nack back-off) go back to ready;
--   2. expired leases go back to ready, or to dead after max_attempts deliveries;
--   3. ready messages are taken oldest first: one superseded by a newer build of its own job is
--      collapsed, one whose blockers run is deferred, the rest are leased with a fresh fencing
--      token.
-- Returns {deliveries, dead, blocked, collapsed, next_due_in_ms}:
--   deliveries: flat {id, token, attempt, message, ...}
--   dead / collapsed: flat {id, message, ...}     blocked: flat {id, message, blocking job, ...}
--   next_due_in_ms: time until the earliest delayed due time or lease deadline, -1 when none
-- Each minute's deliveries and the builds left waiting (ready or deferred) after the minute's
-- last fetch are kept in a ring of 60 fields (minute % 60 -> 'minute:count:waiting') for the
-- operator's view of the last hour; written only when the figures change.
-- KEYS: ready, leased, delayed, jobs, meta, dead, running, where, newest, lease-seq, blocked, acked,
--       dispatched
-- ARGV: max, visibility ms, max attempts, blocked re-check ms, cluster
local max = tonumber(ARGV[1])
local visibility = tonumber(ARGV[2])
local max_attempts = tonumber(ARGV[3])
local recheck = tonumber(ARGV[4])
local deliveries, dead, blocked, collapsed = {}, {}, {}, {}

local function meta(id)
  local raw = redis.call('HGET', KEYS[5], id)
  if raw then return cjson.decode(raw) end
  return nil
end

local function forget(id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[8], id)
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[3], id)
  local m = meta(id)
  if m then redis.call('ZADD', KEYS[1], m.score, id) end
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], id)
  local m = meta(id)
  if m then
    if m.deliveries >= max_attempts then
      redis.call('ZADD', KEYS[6], now, id)
      redis.call('HDEL', KEYS[8], id)
      if m.jobId ~= '' and redis.call('HGET', KEYS[7], m.jobId) == id then
        redis.call('HDEL', KEYS[7], m.jobId)
      end
      table.insert(dead, id)
      table.insert(dead, redis.call('HGET', KEYS[4], id) or '')
    else
      redis.call('ZADD', KEYS[1], m.score, id)
    end
  end
end

local budget = max + 500
while #deliveries < max * 4 and budget > 0 do
  local ids = redis.call('ZRANGE', KEYS[1], 0, 49)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if #deliveries >= max * 4 or budget <= 0 then break end
    budget = budget - 1
    redis.call('ZREM', KEYS[1], id)
    local m = meta(id)
    if m then
      local holder_job = nil
      local same_only = true
      for _, job in ipairs(m.blockers or {}) do
        local job_key = tostring(job)
        local holder = redis.call('HGET', KEYS[7], job_key)
        if holder and holder ~= id then
          holder_job = holder_job or job_key
          if job_key ~= m.jobId then same_only = false end
        end
      end
      -- Collapse: a build held back by its own job gives way to a newer build of that job
      -- that is still waiting or already delivered.
      local superseded = false
      if m.collapse and tonumber(id) and m.jobId ~= '' then
        local own = false
        for _, job in ipairs(m.blockers or {}) do
          if tostring(job) == m.jobId then own = true end
        end
        local newest = redis.call('HGET', KEYS[9], m.jobId)
        if own and newest and tonumber(newest) > tonumber(id)
          and (redis.call('HEXISTS', KEYS[8], newest) == 1 or redis.call('ZSCORE', KEYS[12], newest)) then
          superseded = true
        end
      end
      if superseded then
        table.insert(collapsed, id)
        table.insert(collapsed, redis.call('HGET', KEYS[4], id) or '')
        forget(id)
      elseif holder_job then
        local wait = recheck
        if same_only and m.sameJobWaitMs and m.sameJobWaitMs > 0 then wait = m.sameJobWaitMs end
        redis.call('ZADD', KEYS[3], now + wait, id)
        local waiting = cjson.decode(redis.call('HGET', KEYS[11], holder_job) or '[]')
        table.insert(waiting, ARGV[5] .. '\t' .. id)
        redis.call('HSET', KEYS[11], holder_job, cjson.encode(waiting))
        if not m.blockedReported then
          m.blockedReported = true
          redis.call('HSET', KEYS[5], id, cjson.encode(m))
          table.insert(blocked, id)
          table.insert(blocked, redis.call('HGET', KEYS[4], id) or '')
          table.insert(blocked, holder_job)
        end
      else
        m.deliveries = m.deliveries + 1
        m.token = tostring(redis.call('INCR', KEYS[10]))
        redis.call('HSET', KEYS[5], id, cjson.encode(m))
        redis.call('ZADD', KEYS[2], now + visibility, id)
        if m.jobId ~= '' then redis.call('HSET', KEYS[7], m.jobId, id) end
        table.insert(deliveries, id)
        table.insert(deliveries, m.token)
        table.insert(deliveries, tostring(m.deliveries))
        table.insert(deliveries, redis.call('HGET', KEYS[4], id) or '')
      end
    end
  end
end

do
  local minute = math.floor(now / 60000)
  local field = tostring(minute % 60)
  local stored = redis.call('HGET', KEYS[13], field) or ''
  local at, count = string.match(stored, '^(%d+):(%d+)')
  if tonumber(at) ~= minute then count = 0 end
  local waiting = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[3])
  local figures = minute .. ':' .. (tonumber(count) + #deliveries / 4) .. ':' .. waiting
  if figures ~= stored then
    redis.call('HSET', KEYS[13], field, figures)
    redis.call('PEXPIRE', KEYS[13], 7200000)
  end
end

local next_due = -1
for _, key in ipairs({KEYS[3], KEYS[2]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first == 2 then
    local due = math.max(tonumber(first[2]) - now, 0)
    if next_due < 0 or due < next_due then next_due = due end
  end
end
return {deliveries, dead, blocked, collapsed, next_due}
