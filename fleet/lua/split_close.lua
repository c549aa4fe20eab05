-- split_close.lua: after the last part's worker published the parent's terminal event
-- (worker/parts.py): acknowledge the part, record the parent as completed (if no day failed),
-- advance the chat's high-water mark (a parent with after_id, every day ok), and drop the
-- parent's record. Same mark rule as ack.lua: never lowered.
--
-- KEYS[1] processing:<worker_id>  list
-- KEYS[2] completed    zset   KEYS[3] deliveries  hash   KEYS[4] retries  hash
-- KEYS[5] running      hash
-- KEYS[6] split:<parent>  hash   KEYS[7] :pending  set   KEYS[8] :files  set
-- KEYS[9] :failed  hash   KEYS[10] hwm  hash
--
-- ARGV[1] the part's raw entry   ARGV[2] part command_id   ARGV[3] parent command_id
-- ARGV[4] '1' the parent completed   ARGV[5] retention of completed ids (ms)
-- ARGV[6] chat key for the mark ('' = none)   ARGV[7] mark id   ARGV[8] mark day
--
-- Returns 1.

redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[2])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  if ARGV[6] ~= '' then
    local id = tonumber(ARGV[7])
    local old = redis.call('HGET', KEYS[10], ARGV[6])
    local keep = false
    if old then
      local ok, mark = pcall(cjson.decode, old)
      if ok and type(mark) == 'table' and tonumber(mark['id']) then
        local old_id = tonumber(mark['id'])
        keep = old_id > id or (old_id == id and tostring(mark['day']) > ARGV[8])
      end
    end
    if not keep then
      redis.call('HSET', KEYS[10], ARGV[6], cjson.encode({
        id = id, day = ARGV[8], at = now, command_id = ARGV[3],
      }))
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
redis.call('DEL', KEYS[6], KEYS[7], KEYS[8], KEYS[9])
return 1
