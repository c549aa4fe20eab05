-- replace.lua: swap a raw command in a processing list for its normalised form (e.g. with the
-- command_id the worker assigned), so that a redelivery after a crash keeps the same id.
--
-- KEYS[1] processing:<worker_id>  list
-- ARGV[1] the entry as taken   ARGV[2] the entry to store instead
--
-- Returns 1 if replaced, 0 if the entry is no longer in the list (recovered meanwhile).

local index = redis.call('LPOS', KEYS[1], ARGV[1])
if not index then
  return 0
end
redis.call('LSET', KEYS[1], index, ARGV[2])
return 1
