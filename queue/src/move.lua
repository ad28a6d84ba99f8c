-- Move a waiting message from one cluster's queue to another's (HA re-routing), atomically so
-- it is never in both and never in neither. Leased messages stay: an agent holds them. So do
-- pinned ones (re-queued after their cluster acknowledged them: its agent may still run them).
--   {'moved', dst} | {'leased', src} | {'pinned', src} | {'elsewhere', owner} | {'absent', ''}
-- KEYS: src ready, src delayed, src leased, src jobs, src meta, dst ready, dst jobs, dst meta,
--       where
-- ARGV: id, src, dst, doorbell channel
local id = ARGV[1]
local owner = redis.call('HGET', KEYS[9], id)
if owner ~= ARGV[2] then return {'elsewhere', owner or ''} end
if redis.call('ZSCORE', KEYS[3], id) then return {'leased', ARGV[2]} end
local score = redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[2], id)
local message = redis.call('HGET', KEYS[4], id)
local meta = redis.call('HGET', KEYS[5], id)
if not score or not message or not meta then return {'absent', ''} end
if cjson.decode(meta).pinned then return {'pinned', ARGV[2]} end
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
redis.call('HSET', KEYS[7], id, message)
redis.call('HSET', KEYS[8], id, meta)
redis.call('ZADD', KEYS[6], score, id)
redis.call('HSET', KEYS[9], id, ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return {'moved', ARGV[3]}
