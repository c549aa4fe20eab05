-- flood.lua: pause one session for one request class, and record a FloodWait (issue 4).
--
-- The pause is set from Redis TIME, and an existing longer pause is kept (two FloodWaits in
-- flight must not shorten each other). With ARGV[5] = '1' the event is also appended to the
-- capped flood stream and counted for the governor. Key schema: fleet/keys.py.
--
-- KEYS[1] pause:<session>:<cls>   string  paused until, µs (PX TTL = the pause)
-- KEYS[2] floods                  stream  session, class, seconds, worker
-- KEYS[3] counters                hash    <cls>:floods, session:<s>:<cls>:floods, rate_limit_hits
-- KEYS[4] hold:<cls>              string  fleet hold until, µs (PX TTL = the hold)
-- KEYS[5] flooded:<cls>           hash    session -> µs of its last FloodWait on the class
--
-- ARGV[1] session  ARGV[2] class  ARGV[3] pause ms (<= 0 lifts the pause)
-- ARGV[4] seconds Telegram asked for (N)  ARGV[5] record '1'|'0'  ARGV[6] stream max length
-- ARGV[7] worker id   ARGV[8] fleet hold ms (recorded floods only; <= 0: none)
-- ARGV[9] holds channel: a new or longer hold is PUBLISHed there as '<cls> <hold ms>', so
--         workers sleeping on a slot booked before the flood wake and wait the hold out
-- ARGV[10] shared-flood window ms: the hold is set only when another session flooded the class
--         within it (evidence of a limit the sessions share; one account's own limit must not
--         stall its fleet-mates); <= 0: every recorded flood holds
--
-- Returns the pause in force afterwards, µs from now (0: none).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause_ms = tonumber(ARGV[3])

if ARGV[5] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
    'session', ARGV[1], 'class', ARGV[2], 'seconds', ARGV[4], 'worker', ARGV[7])
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':floods', 1)
  redis.call('HINCRBY', KEYS[3], 'session:' .. ARGV[1] .. ':' .. ARGV[2] .. ':floods', 1)
  redis.call('HINCRBY', KEYS[3], 'rate_limit_hits', 1)
  -- Another session flooding the class within the window means the window Telegram found
  -- full is one they share: it is full for every session sending into it, so hold the whole
  -- class briefly (an existing longer hold is kept) and let it drain instead of flooding again.
  -- A flood with no such company belongs to the account's own limit: its pause is enough.
  local window_us = (tonumber(ARGV[10]) or 0) * 1000
  local shared = window_us <= 0
  if not shared then
    local seen = redis.call('HGETALL', KEYS[5])
    for i = 1, #seen, 2 do
      local at = tonumber(seen[i + 1]) or 0
      if at < now - window_us then
        redis.call('HDEL', KEYS[5], seen[i])
      elseif seen[i] ~= ARGV[1] then
        shared = true
      end
    end
    redis.call('HSET', KEYS[5], ARGV[1], string.format('%d', now))
    redis.call('PEXPIRE', KEYS[5], math.ceil(window_us / 1000) + 1000)
  end
  local hold_ms = tonumber(ARGV[8]) or 0
  if shared and hold_ms > 0 then
    local held = tonumber(redis.call('GET', KEYS[4])) or 0
    local hold_until = now + hold_ms * 1000
    if hold_until > held then
      redis.call('SET', KEYS[4], string.format('%d', hold_until), 'PX', hold_ms)
      redis.call('PUBLISH', ARGV[9], ARGV[2] .. ' ' .. string.format('%d', hold_ms))
    end
  end
end

if pause_ms <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
local current = tonumber(redis.call('GET', KEYS[1])) or 0
local wanted = now + pause_ms * 1000
if wanted > current then
  redis.call('SET', KEYS[1], string.format('%d', wanted), 'PX', pause_ms)
  return pause_ms * 1000
end
return current - now
