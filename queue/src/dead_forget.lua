-- Forget a dead letter: off the dead set, its message and state dropped. Only while it is dead:
-- one queued again meanwhile (enqueue takes it off the dead set) keeps its message.
-- Returns 1 when it was forgotten, 0 when it was not a dead letter of this cluster.
-- KEYS: dead, jobs, meta
-- ARGV: id
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
