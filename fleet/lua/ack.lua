-- ack.lua: the end of one execution, atomic with its ownership. Removes the command from the
-- worker's processing list and, only if it was there (the worker still owns it), forgets its
-- delivery and retry counts, records a completed id in the completed set (trimming ids older
-- than the retention) and publishes the terminal event. A worker that lost the command (its
-- lease expired while it was paused and a recovery gave the command to another worker) removes
-- nothing, publishes nothing and touches no counter: the other execution reports.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] completed               zset  command_id -> completion time (ms, Redis TIME)
-- KEYS[3] deliveries              hash  command_id -> recoveries
-- KEYS[4] retries                 hash  command_id -> retryable failures
-- KEYS[5] running                 hash  command_id -> lease token of the execution
-- KEYS[6] worker:<worker_id>      string (the worker lease; '' = not checked)
-- KEYS[7] events                  stream (terminal events)
--
-- ARGV[1] the raw entry   ARGV[2] command_id   ARGV[3] 1 = mark completed, 0 = do not
-- ARGV[4] retention of completed ids in ms
-- ARGV[5] the worker's lease token: a lease held under another token means another process
--         (a restart under the same WORKER_ID) owns this processing list now
-- ARGV[6] terminal event JSON ('' = none)   ARGV[7] events channel   ARGV[8] stream MAXLEN
--
-- Optional, for the incremental scheduler (issue 14): advance a chat's high-water mark in this
-- same step, so the mark never runs ahead of the files and progress the worker wrote before
-- acknowledging. Only for a completed command; never lowered.
-- KEYS[8] hwm   hash  chat key -> JSON {id, day, at, command_id}
-- ARGV[9] chat key   ARGV[10] mark id   ARGV[11] mark day (YYYY-MM-DD)
--
-- Returns the number of entries removed from the processing list (0: not ours any more).

if KEYS[6] ~= nil and KEYS[6] ~= '' and ARGV[5] ~= nil and ARGV[5] ~= '' then
  local holder = redis.call('GET', KEYS[6])
  if holder and holder ~= ARGV[5] then
    return 0
  end
end
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then
  return 0
end
local cid = ARGV[2]
if cid ~= '' then
  redis.call('HDEL', KEYS[3], cid)
  redis.call('HDEL', KEYS[4], cid)
  redis.call('HDEL', KEYS[5], cid)
  if ARGV[3] == '1' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZADD', KEYS[2], now, cid)
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
  end
end
if KEYS[8] and ARGV[9] and ARGV[9] ~= '' and ARGV[3] == '1' then
  local id = tonumber(ARGV[10])
  local old = redis.call('HGET', KEYS[8], ARGV[9])
  local keep = false
  if old then
    local ok, mark = pcall(cjson.decode, old)
    if ok and type(mark) == 'table' and tonumber(mark['id']) then
      local old_id = tonumber(mark['id'])
      keep = old_id > id or (old_id == id and tostring(mark['day']) > ARGV[11])
    end
  end
  if not keep then
    local t = redis.call('TIME')
    local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('HSET', KEYS[8], ARGV[9], cjson.encode({
      id = id, day = ARGV[11], at = at, command_id = cid,
    }))
  end
end
if ARGV[6] ~= nil and ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[6])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[6])
end
return removed
