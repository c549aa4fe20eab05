-- schedule_tick.lua: one tick of the incremental scheduler (governor/incremental.py), atomic.
--
-- 1. Sweep: every command in sched:inflight that is no longer anywhere (queued, delayed,
--    held -- taken or running -- in a registered worker's processing list, or split into
--    parts that are not all over) is over; its
--    chat's state records the result (ok if its command_id is in the completed set) and the
--    chat is free again.
--    Because taking, retrying, recovering and acknowledging each move a command atomically,
--    "not anywhere" means "over": the scheduler needs no hook in the terminal paths.
-- 2. Push: for each candidate, in the caller's order (priority first), unless its chat is
--    still busy or PARSER_MAX_CONCURRENCY commands are in flight: compare-and-set the chat's
--    seq and high-water mark as the caller saw them (a second governor that read the same
--    state, or a mark that moved since, pushes nothing), record the command in sched:inflight
--    and sched:state, and RPUSH it to tg_commands -- all in this one call, so a governor
--    killed at any instant leaves either both or neither.
--
-- KEYS[1] sched:inflight  hash  chat key -> raw command
-- KEYS[2] sched:state     hash  chat key -> JSON state
-- KEYS[3] tg_commands     list
-- KEYS[4] delayed         zset  raw command -> due time
-- KEYS[5] workers         hash  worker_id -> registration (whose processing lists to search)
-- KEYS[6] running         hash  (unused: a running command is in its worker's processing list,
--                               and a stale entry of a dead worker must not block a chat)
-- KEYS[7] completed       zset  command_id -> completion time
-- KEYS[8] hwm             hash  chat key -> JSON high-water mark
-- (processing:<worker_id> lists and split:<id> records are named here from ARGV[1] and ARGV[3]:
-- the workers must be read inside the script -- a worker registered between a caller's read and
-- this call would hold a command the sweep cannot see, and its chat would get a second one.
-- They share the {tgf} hash tag, so they live in the one slot of every other key here.)
--
-- ARGV[1] processing-list prefix   ARGV[2] max in flight
-- ARGV[3] split-record prefix: a command split into per-day parts is in flight while its
--         split:<command_id> record exists (worker/parts.py)
-- ARGV[4..] groups of 6 per candidate: chat key, expected seq, expected hwm JSON ('' = none),
--           new seq, mode, raw command JSON
--
-- Returns {in_flight_after, pushed chat keys (array), finished (array of "key result")}.

local function still_there(raw, cid)
  if redis.call('LPOS', KEYS[3], raw) then return true end
  if redis.call('ZSCORE', KEYS[4], raw) then return true end
  if cid and redis.call('EXISTS', ARGV[3] .. cid) == 1 then return true end
  for _, wid in ipairs(redis.call('HKEYS', KEYS[5])) do
    if redis.call('LPOS', ARGV[1] .. wid, raw) then return true end
  end
  return false
end

local function state_of(key)
  local raw = redis.call('HGET', KEYS[2], key)
  if raw then
    local ok, st = pcall(cjson.decode, raw)
    if ok and type(st) == 'table' then return st end
  end
  return {seq = 0, failures = 0}
end

local t = redis.call('TIME')  -- one clock for every governor: Redis's
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local busy = {}
local count = 0
local finished = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local key, raw = entries[i], entries[i + 1]
  local cid = nil
  local ok, cmd = pcall(cjson.decode, raw)
  if ok and type(cmd) == 'table' and type(cmd['command_id']) == 'string' then
    cid = cmd['command_id']
  end
  if still_there(raw, cid) then
    busy[key] = true
    count = count + 1
  else
    redis.call('HDEL', KEYS[1], key)
    local st = state_of(key)
    local result = 'failed'
    if cid and redis.call('ZSCORE', KEYS[7], cid) then result = 'ok' end
    st['result'] = result
    st['finished_ms'] = now
    if result == 'ok' then
      st['failures'] = 0
      st['ok_ms'] = now
    else
      st['failures'] = (st['failures'] or 0) + 1
    end
    redis.call('HSET', KEYS[2], key, cjson.encode(st))
    table.insert(finished, key .. ' ' .. result)
  end
end

local max = tonumber(ARGV[2])
local pushed = {}
for i = 4, #ARGV, 6 do
  if count >= max then break end
  local key = ARGV[i]
  if not busy[key] then
    local st = state_of(key)
    local mark = redis.call('HGET', KEYS[8], key) or ''
    if tostring(st['seq'] or 0) == ARGV[i + 1] and mark == ARGV[i + 2] then
      local raw = ARGV[i + 5]
      local cmd = cjson.decode(raw)
      st['seq'] = tonumber(ARGV[i + 3])
      st['command_id'] = cmd['command_id']
      st['mode'] = ARGV[i + 4]
      st['enqueued_ms'] = now
      redis.call('HSET', KEYS[2], key, cjson.encode(st))
      redis.call('HSET', KEYS[1], key, raw)
      redis.call('RPUSH', KEYS[3], raw)
      busy[key] = true
      count = count + 1
      table.insert(pushed, key)
    end
  end
end
return {count, pushed, finished}
