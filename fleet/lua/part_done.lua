-- part_done.lua: one per-day part of a split command ended (worker/parts.py).
--
-- Counts the part into its parent once (SREM of its day decides: a part run again after its
-- worker died is not counted twice) and, unless it was the last, acknowledges the part. The
-- last part is NOT acknowledged here: its worker publishes the parent's terminal event first
-- and then calls split_close.lua, so a crash in between re-runs the part (its day is complete:
-- skipped) and the terminal event is published again rather than never.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] completed    zset   KEYS[3] deliveries  hash   KEYS[4] retries  hash
-- KEYS[5] running      hash
-- KEYS[6] split:<parent>  hash   KEYS[7] :pending  set   KEYS[8] :files  set
-- KEYS[9] :failed  hash
--
-- ARGV[1] the part's raw entry   ARGV[2] part command_id   ARGV[3] day
-- ARGV[4] '1' ok / '0' failed for good   ARGV[5] processed   ARGV[6] errors   ARGV[7] max id
-- ARGV[8] files JSON array   ARGV[9] error text (failed)   ARGV[10] '1' day partial
-- ARGV[11] retention of completed ids (ms)
--
-- Returns {state, record}: state 0 = the parent is closed already (part acknowledged),
-- 1 = counted, others pending (part acknowledged), 2 = this was the last part (not yet
-- acknowledged); record = flat HGETALL of the parent plus 'done', and for state 2 the
-- 'files' (JSON array) and 'failed' (JSON object day -> error).

local function ack_part()
  redis.call('LREM', KEYS[1], 1, ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[11]))
end

if redis.call('EXISTS', KEYS[6]) == 0 then
  ack_part()
  return {0, {}}
end
if redis.call('SREM', KEYS[7], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[6], 'processed', tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[6], 'errors', tonumber(ARGV[6]))
  local max_id = tonumber(redis.call('HGET', KEYS[6], 'max_id') or '0')
  if tonumber(ARGV[7]) > max_id then
    redis.call('HSET', KEYS[6], 'max_id', ARGV[7])
  end
  for _, f in ipairs(cjson.decode(ARGV[8])) do
    redis.call('SADD', KEYS[8], f)
  end
  if ARGV[4] ~= '1' then
    redis.call('HSET', KEYS[9], ARGV[3], ARGV[9])
  end
  if ARGV[10] == '1' then
    redis.call('HINCRBY', KEYS[6], 'partial', 1)
  end
end
local pending = redis.call('SCARD', KEYS[7])
local record = redis.call('HGETALL', KEYS[6])
local total = tonumber(redis.call('HGET', KEYS[6], 'total'))
table.insert(record, 'done')
table.insert(record, tostring(total - pending))
if pending > 0 then
  ack_part()
  return {1, record}
end
local files = redis.call('SMEMBERS', KEYS[8])
table.sort(files)
table.insert(record, 'files')
table.insert(record, cjson.encode(files))
local failed = redis.call('HGETALL', KEYS[9])
local failed_map = {}
for i = 1, #failed, 2 do failed_map[failed[i]] = failed[i + 1] end
table.insert(record, 'failed')
if #failed == 0 then
  table.insert(record, '{}')
else
  table.insert(record, cjson.encode(failed_map))
end
return {2, record}
