-- release.lua: a stopping worker hands every command it still holds back to the head of the
-- command queue, in the order it took them (so they are the next ones taken). Deliveries are
-- not counted: the worker did not die. Only the holder of the worker lease may do this.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] tg_commands             list
-- KEYS[3] worker:<worker_id>      string (lease)
--
-- ARGV[1] the caller's lease token
--
-- Returns the number of commands handed back, or -1 if the caller no longer holds the lease
-- (a recovery already did it, or is entitled to).

local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[1] then
  return -1
end
local moved = 0
while true do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  redis.call('LPUSH', KEYS[2], raw)
  moved = moved + 1
end
return moved
