-- KEYS: the node set, this node's hash. ARGV: node id, ttl (ms). Returns 0 when the hash was lost.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
