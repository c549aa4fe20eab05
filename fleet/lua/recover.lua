-- recover.lua: give the commands of a dead worker back, checking atomically that it is dead.
--
-- Runs only if the worker's lease is absent (expired: the worker stopped heart-beating). Moves
-- its processing list to the head of the command queue, in the order the worker took them,
-- counting one delivery per command id. A command recovered MAX times (it killed its worker,
-- or was with a worker that died, that often) goes to the dead-letter list instead. Removes
-- the worker from the registry.
--
-- KEYS[1] worker:<worker_id>      string (lease)
-- KEYS[2] processing:<worker_id>  list
-- KEYS[3] tg_commands             list
-- KEYS[4] deliveries              hash  command_id -> recoveries
-- KEYS[5] dead                    list  newest first
-- KEYS[6] workers                 hash  worker_id -> JSON registration
-- KEYS[7] running                 hash  command_id -> "worker_id|lease token" of its execution
--
-- ARGV[1] worker_id   ARGV[2] MAX deliveries   ARGV[3] cap of the dead-letter list
-- ARGV[4] timestamp for dead-letter entries (ISO 8601, caller's clock, display only)
-- ARGV[5] id prefix for dead-letter entries (unique per call)
--
-- Returns {moved, dead_entry_json, dead_entry_json, ...}; {-1} if the worker is alive.
--
-- A recovered command's running[cid] entry naming the dead worker is removed: left there, a
-- process restarted under the same WORKER_ID could be taken for the command's live owner.
-- Deliveries count deaths without progress: an execution that completes a day or writes a page
-- resets its command's count (worker/executor.py), so only an attempt that made no progress
-- moves a command toward the dead letters.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1}
end
local max = tonumber(ARGV[2])
local moved = 0
local out = {0}
local n = 0
while true do
  local raw = redis.call('RPOP', KEYS[2])
  if not raw then break end
  local cid = nil
  local chat = nil
  local ok, decoded = pcall(cjson.decode, raw)
  if ok and type(decoded) == 'table' then
    if type(decoded['command_id']) == 'string' then cid = decoded['command_id'] end
    if type(decoded['chat']) == 'string' then chat = decoded['chat'] end
  end
  if cid and KEYS[7] then
    local owner = redis.call('HGET', KEYS[7], cid)
    if owner and (owner == ARGV[1] or string.sub(owner, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|') then
      redis.call('HDEL', KEYS[7], cid)
    end
  end
  local counter = cid or ('sha1:' .. redis.sha1hex(raw))
  local count = redis.call('HINCRBY', KEYS[4], counter, 1)
  if count >= max then
    n = n + 1
    local entry = cjson.encode({
      id = ARGV[5] .. '-' .. n,
      ts = ARGV[4],
      reason = 'delivered ' .. count .. ' times without being acknowledged '
        .. '(its worker died each time); last worker ' .. ARGV[1],
      error_type = 'PoisonCommand',
      command_id = cid or cjson.null,
      chat = chat or cjson.null,
      worker_id = ARGV[1],
      source = 'recovery',
      payload = raw,
      payload_bytes = string.len(raw),
      truncated = false,
    })
    redis.call('LPUSH', KEYS[5], entry)
    redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[3]) - 1)
    redis.call('HDEL', KEYS[4], counter)
    table.insert(out, entry)
  else
    redis.call('LPUSH', KEYS[3], raw)
    moved = moved + 1
  end
end
out[1] = moved
redis.call('HDEL', KEYS[6], ARGV[1])
return out
