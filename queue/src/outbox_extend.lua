-- Pushes back the due time of entries still pending with the given status: a reporter at work
-- keeps its claim.
-- KEYS: events, due
-- ARGV: lease ms, then build id, status pairs
for i = 2, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current and cjson.decode(current).status == ARGV[i + 1] then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[i])
  end
end
return 1
