-- dead_letter.lua: move one command from a processing list to the dead-letter list.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] dead                    list  newest first, JSON entries (see worker/queue.py)
-- KEYS[3] deliveries              hash
-- KEYS[4] retries                 hash
-- KEYS[5] running                 hash
--
-- ARGV[1] the raw entry   ARGV[2] the dead-letter entry (JSON)   ARGV[3] cap of the list
-- ARGV[4] command_id ('' when unknown)
--
-- Returns the number of entries removed from the processing list.

local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
if ARGV[4] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[4])
  redis.call('HDEL', KEYS[4], ARGV[4])
  redis.call('HDEL', KEYS[5], ARGV[4])
end
return removed
