-- breaker.lua: the fleet's circuit breaker, a state machine on one hash (issue 4).
--
-- closed --(THRESHOLD transient failures within WINDOW, fleet-wide)--> open
-- open --(OPEN_TIMEOUT elapsed; bucket.lua grants one probe lease)--> half_open
-- half_open --(the probe holder reports success)--> closed
-- half_open --(the probe holder reports failure)--> open (again)
-- A probe whose holder never reports loses its lease when it expires; bucket.lua then grants a
-- new one. Failures reported by others while open/half-open are late answers to requests sent
-- before the breaker opened and are ignored. Time is Redis TIME. Key schema: fleet/keys.py.
--
-- KEYS[1] breaker         hash    state, until_us, failures (csv µs), changed_us, opened
-- KEYS[2] breaker:probe   string  probe holder token (PX lease)
--
-- ARGV[1] op: failure | success | status | reset
-- ARGV[2] token of the caller's probe ('' when it holds none)
-- ARGV[3] failure threshold  ARGV[4] window µs  ARGV[5] open timeout µs
--
-- Returns {state, transition, retry_after_us}
--   state: closed | open | half_open (half_open also once an open period has run out)
--   transition: '' | opened | reopened | closed (this call made it; the caller logs it)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op, token = ARGV[1], ARGV[2]
local threshold = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local timeout = tonumber(ARGV[5])

local function fmt(n) return string.format('%d', n) end

local h = redis.call('HMGET', KEYS[1], 'state', 'until_us', 'failures')
local state = h[1] or 'closed'
local b_until = tonumber(h[2]) or 0

local function effective()
  if state == 'closed' then return {'closed', '', 0} end
  if now < b_until then return {'open', '', b_until - now} end
  return {'half_open', '', 0}
end

local function holds_probe()
  return token ~= '' and redis.call('GET', KEYS[2]) == token
end

local function open(transition)
  redis.call('HSET', KEYS[1], 'state', 'open', 'until_us', fmt(now + timeout),
    'failures', '', 'changed_us', fmt(now))
  redis.call('HINCRBY', KEYS[1], 'opened', 1)
  redis.call('DEL', KEYS[2])
  return {'open', transition, timeout}
end

if op == 'failure' then
  if state ~= 'closed' then
    if holds_probe() then return open('reopened') end
    return effective()
  end
  -- Keep only the failures inside the window, at most `threshold` of them (one key, bounded).
  local kept = {}
  for ts in string.gmatch(h[3] or '', '[^,]+') do
    if now - tonumber(ts) <= window then kept[#kept + 1] = ts end
  end
  kept[#kept + 1] = fmt(now)
  while #kept > threshold do table.remove(kept, 1) end
  if #kept >= threshold then return open('opened') end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', table.concat(kept, ','))
  return {'closed', '', 0}
elseif op == 'success' then
  if state ~= 'closed' and holds_probe() then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'until_us', '0', 'failures', '',
      'changed_us', fmt(now))
    redis.call('DEL', KEYS[2])
    return {'closed', 'closed', 0}
  end
  return effective()
elseif op == 'status' then
  return effective()
elseif op == 'reset' then
  redis.call('DEL', KEYS[1], KEYS[2])
  if state ~= 'closed' then return {'closed', 'closed', 0} end
  return {'closed', '', 0}
end
return redis.error_reply('breaker.lua: unknown op ' .. tostring(op))
