-- leader.lua: the governor's leader lease (governor/daemon.py). Key schema: governor/keys.py.
--
-- hold:    take the lease if nobody holds it (SET NX PX), or extend it if we hold it
--          (compare-and-extend: a governor that stalled past its TTL and lost the lease to
--          another never extends the other's).
-- release: delete it if we hold it (a clean stop hands over at once, without waiting the TTL).
--
-- KEYS[1] governor:leader  string  token of the leader (PX TTL)
-- ARGV[1] op: hold | release   ARGV[2] our token   ARGV[3] TTL ms
--
-- Returns 2 (taken now), 1 (extended / released), 0 (another governor holds it).

local current = redis.call('GET', KEYS[1])
if ARGV[1] == 'release' then
  if current == ARGV[2] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if current == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 2
end
return 0
