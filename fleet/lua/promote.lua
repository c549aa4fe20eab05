-- promote.lua: move the delayed commands that are due to the tail of the command queue.
--
-- KEYS[1] delayed       zset  raw command -> due time (ms, Redis TIME)
-- KEYS[2] tg_commands   list
--
-- ARGV[1] at most this many per call
--
-- Returns the number of commands moved.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, raw in ipairs(due) do
  redis.call('ZREM', KEYS[1], raw)
  redis.call('RPUSH', KEYS[2], raw)
end
return #due
