-- The process executor's launch markers: records that this host is alive.
-- KEYS: hosts (HASH host → ms). ARGV: host. Returns the Redis clock (ms), which every host shares.
redis.call('HSET', KEYS[1], ARGV[1], now)
return now
