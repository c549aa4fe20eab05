-- bucket.lua: one atomic admission decision per Telegram request (issue 4).
--
-- Reserve-style GCRA (virtual scheduling) on two buckets at once: the session's own bucket
-- for the request class (Telegram's limits are per account) and the fleet's bucket for the
-- class. The answer is either "go after wait_us" with the slot *booked* (the caller sleeps
-- once, no polling) or "refused" without booking (breaker open, another probe in flight, or a
-- wait longer than max_wait_us). Time is Redis TIME, never the
-- caller's clock. Key schema: fleet/keys.py.
--
-- A FloodWait pause is refused (not booked) with its remaining time: a slot booked at the end
-- of a long pause would push the fleet bucket's TAT there and stall every other session. The
-- caller sleeps the pause and asks again (one extra call per FloodWait, which is rare).
--
-- KEYS[1] bucket:session:<session>:<cls>  string  '<TAT µs> <interval µs>'
-- KEYS[2] bucket:fleet:<cls>              string  '<TAT µs> <interval µs>'
-- KEYS[3] pause:<session>:<cls>           string  paused until, µs
-- KEYS[4] rates                           hash    current rates (missing field: ARGV default)
-- KEYS[5] counters                        hash    counters for the governor
-- KEYS[6] breaker                         hash    state, until_us, ...
-- KEYS[7] breaker:probe                   string  token of the half-open probe
-- KEYS[8] hold:<cls>                      string  fleet hold until, µs (a FloodWait's)
-- KEYS[9] window:<session>:<cls>           zset    the µs each admitted request was booked for
--
-- ARGV[1] session   ARGV[2] class
-- ARGV[3] default session rate/s   ARGV[4] default session burst
-- ARGV[5] default fleet rate/s     ARGV[6] default fleet burst
-- ARGV[7] max_wait_us   ARGV[8] probe token   ARGV[9] probe lease ms
-- ARGV[10] how long the window log keeps an admit, µs
--
-- Returns {admitted 0|1, wait_us, reason, transition, send_at_us}
--   admitted: reason is ok | session | fleet (what the wait is for) | probe
--   refused:  reason is breaker | paused | held | session | fleet (the wait exceeds
--             max_wait_us); paused and held are not booked: the caller sleeps and asks again
--   transition: '' or 'half_open' (this call moved the breaker; the caller logs it)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local session, cls = ARGV[1], ARGV[2]
local max_wait = tonumber(ARGV[7])

-- Integers above 1e14 lose digits through tostring(); µs timestamps need %d.
local function fmt(n) return string.format('%d', n) end

local function refuse(wait, reason)
  redis.call('HINCRBY', KEYS[5], cls .. ':refused', 1)
  return {0, math.max(0, math.ceil(wait)), reason, '', 0}
end

-- 1. Breaker: while open nobody sends; after the open timeout one probe fleet-wide.
local b = redis.call('HMGET', KEYS[6], 'state', 'until_us')
local probing = false
if b[1] == 'open' or b[1] == 'half_open' then
  local b_until = tonumber(b[2]) or 0
  if now < b_until then return refuse(b_until - now, 'breaker') end
  probing = true
end

-- 2. Rates: per-session override, then the class's shared value, then the caller's default.
local r = redis.call('HMGET', KEYS[4],
  'session:' .. session .. ':' .. cls .. ':rate', 'session:' .. session .. ':' .. cls .. ':burst',
  'session:' .. cls .. ':rate', 'session:' .. cls .. ':burst',
  'fleet:' .. cls .. ':rate', 'fleet:' .. cls .. ':burst',
  'session:' .. session .. ':' .. cls .. ':window')
local s_rate = tonumber(r[1]) or tonumber(r[3]) or tonumber(ARGV[3])
local s_burst = tonumber(r[2]) or tonumber(r[4]) or tonumber(ARGV[4])
local f_rate = tonumber(r[5]) or tonumber(ARGV[5])
local f_burst = tonumber(r[6]) or tonumber(ARGV[6])
local s_T = 1000000 / s_rate
local f_T = 1000000 / f_rate

-- 3. A pause in force for this session and class, or a fleet hold for the class (FloodWait):
-- refuse, do not book.
local pause_until = tonumber(redis.call('GET', KEYS[3])) or 0
if pause_until > now then return refuse(pause_until - now, 'paused') end
local hold_until = tonumber(redis.call('GET', KEYS[8])) or 0
if hold_until > now then return refuse(hold_until - now, 'held') end

-- 4. GCRA: the earliest time this request conforms to both buckets.
-- A bucket stores its TAT with the interval it was computed at: when the governor changes the
-- rate, the backlog (TAT - now) is rescaled, so a cut bites at once and a raise frees at once.
local function tat_of(key, interval)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local tat, old = string.match(v, '^(%d+) ([%d%.]+)$')
  tat, old = tonumber(tat), tonumber(old)
  if not tat or not old or old <= 0 or tat <= now then return tat or 0 end
  return now + (tat - now) * interval / old
end
local s_tat = tat_of(KEYS[1], s_T)
local f_tat = tat_of(KEYS[2], f_T)
local s_allow = math.max(s_tat, now) + s_T - s_burst * s_T
local f_allow = math.max(f_tat, now) + f_T - f_burst * f_T

-- 4b. An account whose own limit was learned as a window (K requests per W, bursts allowed):
-- the window replaces its own bucket. A request may go once fewer than K of the account's
-- admits (booked ones included) fall in the W before it: at once while the window has room,
-- else when the oldest of the last K leaves it (+1 ms, as Telegram counts it leaving).
local window_k, window_us = string.match(r[7] or '', '^(%d+) (%d+)$')
window_k, window_us = tonumber(window_k), tonumber(window_us)
local windowed = window_k and window_us and window_k > 0 and window_us > 0
if windowed then
  local since = '(' .. fmt(now - window_us)
  local n = redis.call('ZCOUNT', KEYS[9], since, '+inf')
  s_allow = now
  if n >= window_k then
    local e = redis.call('ZRANGEBYSCORE', KEYS[9], since, '+inf', 'WITHSCORES', 'LIMIT',
      n - window_k, 1)
    s_allow = tonumber(e[2]) + window_us + 1000
  end
end
local at = math.max(now, s_allow, f_allow)
local reason = 'ok'
if at > now then
  if at == f_allow then reason = 'fleet' else reason = 'session' end
end
at = math.ceil(at)
local wait = at - now
if wait > max_wait then return refuse(wait, reason) end

-- 5. Half-open: the first caller to take the probe lease goes; everyone else is refused.
local transition = ''
if probing then
  local lease = tonumber(ARGV[9]) + math.ceil(wait / 1000)
  if not redis.call('SET', KEYS[7], ARGV[8], 'NX', 'PX', lease) then
    return refuse(math.max(1000, redis.call('PTTL', KEYS[7]) * 1000), 'breaker')
  end
  if b[1] == 'open' then
    redis.call('HSET', KEYS[6], 'state', 'half_open', 'changed_us', fmt(now))
    transition = 'half_open'
  end
  reason = 'probe'
end

-- 6. Book the slot in both buckets (a booking at `at` moves each TAT as a request sent then).
-- The fleet bucket is charged when *it* would have admitted the request (f_at <= at): if the
-- session's own bucket is what delays it, charging the fleet at `at` would move the fleet's
-- TAT past every slot in between and stall the other sessions behind one slow account. The
-- fleet still admits at most rate x W + burst per window; a session delays at most its one
-- booked request past its fleet slot.
local f_at = math.max(now, f_allow)
local s_new = math.ceil(math.max(s_tat, at) + s_T)
local f_new = math.ceil(math.max(f_tat, f_at) + f_T)
if not windowed then  -- a window replaces the account's own bucket: leave its TAT alone
  redis.call('SET', KEYS[1], fmt(s_new) .. string.format(' %.3f', s_T),
    'PX', math.ceil((s_new - now) / 1000) + 1000)
end
redis.call('SET', KEYS[2], fmt(f_new) .. string.format(' %.3f', f_T),
  'PX', math.ceil((f_new - now) / 1000) + 1000)

redis.call('HINCRBY', KEYS[5], cls .. ':admits', 1)
local admits = redis.call('HINCRBY', KEYS[5], 'session:' .. session .. ':' .. cls .. ':admits', 1)
-- The window log (kept whether or not a window is set, so the governor can set one at a
-- FloodWait and the requests already in Telegram's window count from then on).
local horizon = tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. fmt(now - horizon))
redis.call('ZADD', KEYS[9], fmt(at), fmt(at) .. ':' .. admits)
redis.call('PEXPIRE', KEYS[9], math.ceil((at - now + horizon) / 1000))
if wait > 0 then
  redis.call('HINCRBY', KEYS[5], cls .. ':waits', 1)
  redis.call('HINCRBY', KEYS[5], cls .. ':wait_us', wait)
  if reason == 'fleet' then redis.call('HINCRBY', KEYS[5], cls .. ':fleet_waits', 1) end
end
return {1, wait, reason, transition, at}
