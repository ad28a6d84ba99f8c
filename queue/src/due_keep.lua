-- Keeps (or replaces) an item and makes it due after a delay.
-- KEYS: items (HASH field → body), due (ZSET field → due time ms)
-- ARGV: field, body, delay ms
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
