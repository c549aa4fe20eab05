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
return removed
