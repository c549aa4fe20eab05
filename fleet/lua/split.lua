-- split.lua: replace a per_day command held by a worker with its per-day parts (worker/parts.py).
--
-- Atomic: the parent leaves the worker's processing list, its record is created and every part
-- is pushed to the tail of the queue in one call, so a worker killed at any instant leaves
-- either the parent (split again by whoever runs it next) or the record with all its parts.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] tg_commands             list
-- KEYS[3] split:<parent id>       hash  the parent's record
-- KEYS[4] split:<parent id>:pending  set  days not finished
-- KEYS[5] running                 hash  command_id -> worker (the parent's entry is dropped)
--
-- ARGV[1] the parent's raw entry   ARGV[2] parent command_id   ARGV[3] chat (display)
-- ARGV[4] mode   ARGV[5] params JSON   ARGV[6] started (ms)   ARGV[7] the parent's last day
-- ARGV[8..] pairs: day (YYYY-MM-DD), part raw JSON
--
-- Returns 1 split now; 0 the parent had been split already (a duplicate: dropped from the
-- processing list); -1 the entry is no longer ours (recovered by someone else meanwhile).

if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('LREM', KEYS[1], 1, ARGV[1])
  return 0
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return -1
end
local total = 0
for i = 8, #ARGV, 2 do
  redis.call('SADD', KEYS[4], ARGV[i])
  redis.call('RPUSH', KEYS[2], ARGV[i + 1])
  total = total + 1
end
redis.call('HSET', KEYS[3], 'parent', ARGV[1], 'chat', ARGV[3], 'mode', ARGV[4],
  'params', ARGV[5], 'started_ms', ARGV[6], 'total', total, 'processed', 0, 'errors', 0,
  'partial', 0, 'max_id', 0, 'last_day', ARGV[7])
redis.call('HDEL', KEYS[5], ARGV[2])
return 1
