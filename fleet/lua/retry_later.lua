-- retry_later.lua: take a command out of the processing list and park it in the delayed set
-- until it is due (promote.lua moves it back). Used for a retryable failure (counted against
-- the command's retry budget, with its `failed` event) and for a duplicate deferred while
-- another worker runs the same command_id (not counted, no event). Atomic with ownership (see
-- ack.lua): a command no longer in the processing list is not parked (that would duplicate it).
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] delayed                 zset  raw command -> due time (ms, Redis TIME)
-- KEYS[3] retries                 hash  command_id -> retryable failures
-- KEYS[4] running                 hash  command_id -> lease token of the execution
-- KEYS[5] worker:<worker_id>      string (the worker lease; '' = not checked)
-- KEYS[6] events                  stream
-- KEYS[7] deliveries              hash  command_id -> recoveries (a counted retry resets it:
--                                       an execution that ends in a controlled failure did
--                                       not kill its worker, whatever earlier ones did)
--
-- ARGV[1] the raw entry   ARGV[2] command_id   ARGV[3] delay in ms
-- ARGV[4] '1' = a retry (count it and end this worker's execution), '0' = a deferral
-- ARGV[5] the worker's lease token
-- ARGV[6] event JSON ('' = none)   ARGV[7] events channel   ARGV[8] stream MAXLEN
--
-- Returns the retry count after this one; -1 if the command was not ours any more.

if KEYS[5] ~= nil and KEYS[5] ~= '' and ARGV[5] ~= nil and ARGV[5] ~= '' then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[5] then
    return -1
  end
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[6] ~= nil and ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[6])
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[6])
end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[4], ARGV[2])
  if KEYS[7] then
    redis.call('HDEL', KEYS[7], ARGV[2])
  end
  return redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
return tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
