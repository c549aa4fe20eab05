-- schedule.lua: push one scheduled command exactly once (governor/scheduler.py).
--
-- The marker is set with NX and the command pushed in the same atomic call: a second call for
-- the same chat and day (a restarted governor, a failover, two governors racing) pushes
-- nothing, and no crash can leave a marker without its command. Key schema: fleet/keys.py.
--
-- KEYS[1] schedule:<chat>:<date>   string  marker (EX TTL)
-- KEYS[2] tg_commands              list    the command queue
--
-- ARGV[1] command JSON   ARGV[2] marker TTL seconds
--
-- Returns 1 if pushed now, 0 if it had been pushed before.

if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[2])) then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
