-- dead_letter.lua: move one command from a processing list to the dead-letter list, atomic with
-- its ownership (see ack.lua): a worker that lost the command writes no dead letter and
-- publishes nothing (another execution owns it).
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] dead                    list  newest first, JSON entries (see worker/queue.py)
-- KEYS[3] deliveries              hash
-- KEYS[4] retries                 hash
-- KEYS[5] running                 hash
-- KEYS[6] worker:<worker_id>      string (the worker lease; '' = not checked)
-- KEYS[7] events                  stream
--
-- ARGV[1] the raw entry   ARGV[2] the dead-letter entry (JSON)   ARGV[3] cap of the list
-- ARGV[4] command_id ('' when unknown)   ARGV[5] the worker's lease token
-- ARGV[6] terminal event JSON ('' = none)   ARGV[7] events channel   ARGV[8] stream MAXLEN
--
-- Returns the number of entries removed from the processing list (0: nothing was done).

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
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[4])
  redis.call('HDEL', KEYS[4], ARGV[4])
  redis.call('HDEL', KEYS[5], ARGV[4])
end
if ARGV[6] ~= nil and ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[7], ARGV[6])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[6])
end
return removed
