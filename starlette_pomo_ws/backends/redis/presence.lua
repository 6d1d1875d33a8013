-- Presence. KEYS: the node set, this node's hash. ARGV: node id, prefix, ttl (ms), user field or '',
-- its count, this node's total, and the user field to count across the cluster.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[4] ~= '' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  else
    redis.call('HDEL', KEYS[2], ARGV[4])
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[2], 't', ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
if ARGV[7] == '' then return 0 end
local total = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local count = redis.call('HGET', ARGV[2] .. 'node:' .. node, ARGV[7])
  if count then total = total + tonumber(count) end
end
return total
