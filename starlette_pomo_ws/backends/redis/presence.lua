-- Presence, for a batch of updates and counts, and the position after them (a handshake's count and
-- position, in one round trip).
-- KEYS[1]: the metadata hash, KEYS[2]: the node set. ARGV: a candidate epoch, prefix, ttl (ms), the number
-- of nodes written, then per node: its id, its total, the number of user fields, and that many (field,
-- count) pairs (a count of 0 deletes the field); then the user fields (or 't') to count across the
-- cluster. Returns {one count per field asked, epoch, seq}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local prefix = ARGV[2]
local ttl = tonumber(ARGV[3])
local at = 5
for _ = 1, tonumber(ARGV[4]) do
  local node = ARGV[at]
  local key = prefix .. 'node:' .. node
  local fields = tonumber(ARGV[at + 2])
  redis.call('HSET', key, 't', ARGV[at + 1])
  at = at + 3
  for _ = 1, fields do
    if tonumber(ARGV[at + 1]) > 0 then
      redis.call('HSET', key, ARGV[at], ARGV[at + 1])
    else
      redis.call('HDEL', key, ARGV[at])
    end
    at = at + 2
  end
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', KEYS[2], now + ttl, node)
end
local counts = {}
if at <= #ARGV then
  local live = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
  for i = at, #ARGV do
    local total = 0
    for _, node in ipairs(live) do
      local count = redis.call('HGET', prefix .. 'node:' .. node, ARGV[i])
      if count then total = total + tonumber(count) end
    end
    counts[#counts + 1] = total
  end
end
return {counts, epoch, tonumber(redis.call('HGET', meta, 'seq'))}
