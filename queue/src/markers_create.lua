-- The process executor's launch markers.
-- Creates a marker unless one exists. KEYS: launches, active. ARGV: id, marker.
-- Returns nil when created, else the existing marker.
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
