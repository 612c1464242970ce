
-- KEYS[1]: the TAT of one (class, key), integer microseconds since the Unix epoch.
-- ARGV[1]: emission interval T; ARGV[2]: tolerance tau; both integer microseconds.
-- Returns {1, 0} when allowed, {0, retry_after_us} when limited.

-- Redis before 5.0 refuses writes after TIME unless the script replicates its
-- effects instead of itself; later versions always do and keep this as a no-op.
if redis.replicate_commands then redis.replicate_commands() end

-- The server's clock, so that replicas with skewed clocks share one timeline.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])

-- GET answers false for a missing key and tonumber(false) is nil. A missing or
-- past TAT both mean a full budget.
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end

local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now}
end

local new_tat = tat + interval
-- Once new_tat has passed, the key means the same as no key: expire it then,
-- rounded up to the next millisecond plus one. string.format keeps all digits
-- (Lua's default number formatting would round to 14 significant digits).
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
