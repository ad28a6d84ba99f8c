-- The clock every timed script starts with (`sd_queue::timed_script` prepends it): Redis's own
-- time, so replicas and hosts with different clocks agree, as `now` in milliseconds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
