-- KEYS: the set of nodes with members, this node's member hash. ARGV: node id, ttl (ms).
-- Returns 0 when the hash is not complete (it was forgotten as dead, or lost): then the node writes it whole.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('HEXISTS', KEYS[2], '#')
