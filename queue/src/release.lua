-- A build finished: its job stops counting as running (if this build is the one running), and
-- the builds deferred behind that job are returned as {cluster, id, ...} for the caller to
-- promote at once. Promoting one still blocked is harmless: the next fetch defers it again.
-- KEYS: running, blocked
-- ARGV: jobId, buildId
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local out = {}
local waiting = cjson.decode(redis.call('HGET', KEYS[2], ARGV[1]) or '[]')
redis.call('HDEL', KEYS[2], ARGV[1])
for _, entry in ipairs(waiting) do
  local tab = string.find(entry, '\t', 1, true)
  if tab then
    table.insert(out, string.sub(entry, 1, tab - 1))
    table.insert(out, string.sub(entry, tab + 1))
  end
end
return out
