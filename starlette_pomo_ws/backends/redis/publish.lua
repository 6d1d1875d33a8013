-- KEYS[1]: the metadata hash. ARGV: candidate epoch, prefix, user id, is user ('1'/'0'), head,
-- history size, history ttl (ms), marker ttl (s), clock bucket (s). Returns {epoch, seq, milliseconds}.
local prefix = ARGV[2]
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local now_ms = now * 1000 + math.floor(tonumber(clock[2]) / 1000)
local marker_ttl = tonumber(ARGV[8])
local bucket = math.floor(now / tonumber(ARGV[9]))
if tonumber(redis.call('HGET', meta, 'bucket') or -1) ~= bucket then
  -- every seq up to seq - 1 was given out before now
  local checkpoints = prefix .. epoch .. ':clock'
  redis.call('HSET', meta, 'bucket', bucket)
  redis.call('ZADD', checkpoints, now, seq - 1)
  redis.call('ZREMRANGEBYSCORE', checkpoints, '-inf', '(' .. (now - marker_ttl))
  redis.call('EXPIRE', checkpoints, marker_ttl + 2 * tonumber(ARGV[9]))
end
local uid = ARGV[3]
local stream, last, channel, ulen
if ARGV[4] == '1' then
  stream = prefix .. epoch .. ':u:' .. uid
  last = prefix .. epoch .. ':l:' .. uid
  channel = prefix .. 'u:' .. uid
  ulen = string.len(uid)
else
  stream = prefix .. epoch .. ':all'
  last = prefix .. epoch .. ':lall'
  channel = prefix .. 'all'
  ulen = -1
end
-- Drop entries older than the history TTL (a few per publish), so an active stream keeps only
-- what can still be replayed. The `p` of the first kept entry then names the last one dropped.
local horizon = now_ms - tonumber(ARGV[7])
local function stamp(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return tonumber(fields[i + 1]) end
  end
  return 0
end
local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if oldest[1] and stamp(oldest[1][2]) < horizon then
  local cut
  for _, entry in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', 32)) do
    if stamp(entry[2]) >= horizon then
      cut = entry[1]
      break
    end
    cut = (tonumber(string.sub(entry[1], 1, -3)) + 1) .. '-0'
  end
  redis.call('XTRIM', stream, 'MINID', cut)
end
local prev = redis.call('GET', last) or '0'
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[6], seq .. '-0', 'h', ARGV[5], 'p', prev, 't', now_ms)
redis.call('PEXPIRE', stream, ARGV[7])
redis.call('SET', last, seq, 'EX', marker_ttl)
-- The publish time rides along, for the lag metric of the nodes that deliver it.
redis.call('PUBLISH', channel, epoch .. '|' .. seq .. '|' .. now_ms .. '|' .. ulen .. '|' .. uid .. ARGV[5])
return {epoch, seq, now_ms}
