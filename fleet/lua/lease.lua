-- lease.lua: take or refresh a lease held under a random token (worker and session leases).
--
-- KEYS[1] the lease key (string; value = holder token; PX TTL)
-- ARGV[1] token of the caller   ARGV[2] TTL in ms
--
-- Returns 1 when the caller held the lease and it was refreshed, 2 when the lease was free and
-- the caller now holds it (first claim, or re-claim after it expired), 0 when someone else
-- holds it (nothing changed).

local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
