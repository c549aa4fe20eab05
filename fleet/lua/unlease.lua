-- unlease.lua: give a lease up, only if the caller still holds it.
--
-- KEYS[1] the lease key   ARGV[1] token of the caller
-- Returns 1 if it was deleted, 0 if it was held by someone else or already gone.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
