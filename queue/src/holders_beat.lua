-- An instance says it is alive: its name scored with Redis's time.
-- KEYS: instances   ARGV: instance
redis.call('ZADD', KEYS[1], now, ARGV[1])
return now
