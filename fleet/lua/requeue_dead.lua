-- requeue_dead.lua: an operator puts one dead letter back on the command queue (at the tail),
-- giving it its full delivery and retry budget again. Exactly once: the entry is removed first.
--
-- KEYS[1] dead          list
-- KEYS[2] tg_commands   list
-- KEYS[3] deliveries    hash
-- KEYS[4] retries       hash
-- KEYS[5] completed     zset
-- KEYS[6] running       hash  (its entry, left by the execution that died, is removed)
--
-- ARGV[1] the dead-letter entry, exactly as stored   ARGV[2] the payload to requeue
-- ARGV[3] command_id ('' when unknown)
--
-- Returns 1 if requeued, 0 if the entry was not there (requeued by someone else).

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3])
  redis.call('ZREM', KEYS[5], ARGV[3])
  if KEYS[6] then
    redis.call('HDEL', KEYS[6], ARGV[3])
  end
end
return 1
