-- ack.lua: the end of one execution. Removes the command from the worker's processing list,
-- forgets its delivery and retry counts, and (for a completed command) records its id in the
-- completed set, trimming ids older than the retention.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] completed               zset  command_id -> completion time (ms, Redis TIME)
-- KEYS[3] deliveries              hash  command_id -> recoveries
-- KEYS[4] retries                 hash  command_id -> retryable failures
-- KEYS[5] running                 hash  command_id -> worker executing it
--
-- ARGV[1] the raw entry   ARGV[2] command_id   ARGV[3] 1 = mark completed, 0 = do not
-- ARGV[4] retention of completed ids in ms
--
-- Optional, appended for the incremental scheduler (issue 14): advance a chat's high-water
-- mark in this same step, so the mark never runs ahead of the files and progress the worker
-- wrote before acknowledging. Only for a completed command; never lowered.
-- KEYS[6] hwm   hash  chat key -> JSON {id, day, at, command_id}
-- ARGV[5] chat key   ARGV[6] mark id   ARGV[7] mark day (YYYY-MM-DD)
--
-- Returns the number of entries removed from the processing list (0: it had been recovered
-- by someone else meanwhile).

local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
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
if KEYS[6] and ARGV[5] and ARGV[5] ~= '' and ARGV[3] == '1' then
  local id = tonumber(ARGV[6])
  local old = redis.call('HGET', KEYS[6], ARGV[5])
  local keep = false
  if old then
    local ok, mark = pcall(cjson.decode, old)
    if ok and type(mark) == 'table' and tonumber(mark['id']) then
      local old_id = tonumber(mark['id'])
      keep = old_id > id or (old_id == id and tostring(mark['day']) > ARGV[7])
    end
  end
  if not keep then
    local t = redis.call('TIME')
    local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('HSET', KEYS[6], ARGV[5], cjson.encode({
      id = id, day = ARGV[7], at = at, command_id = cid,
    }))
  end
end
return removed
