-- retry_later.lua: take a command out of the processing list and park it in the delayed set
-- until it is due (promote.lua moves it back). Used for a retryable failure (counted against
-- the command's retry budget) and for a duplicate deferred while another worker runs the same
-- command_id (not counted).
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] delayed                 zset  raw command -> due time (ms, Redis TIME)
-- KEYS[3] retries                 hash  command_id -> retryable failures
-- KEYS[4] running                 hash  command_id -> worker executing it
--
-- ARGV[1] the raw entry   ARGV[2] command_id   ARGV[3] delay in ms
-- ARGV[4] '1' = a retry (count it and end this worker's execution), '0' = a deferral
--
-- Returns the retry count after this one.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[4], ARGV[2])
  return redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
return tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
