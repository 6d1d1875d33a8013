-- Publishes a batch of events, in order, with consecutive seqs.
-- KEYS[1]: the metadata hash. ARGV: candidate epoch, prefix, history size, history ttl (ms), marker ttl (s),
-- clock bucket (s), then three per event: its stream's name (a user id, a channel, or ''), its kind ('0' the
-- broadcast stream, '1' a user, '2' a channel, '3' a channel whose event is also kept as its state), head.
-- Returns {epoch, seq of the first event, milliseconds}.
local prefix = ARGV[2]
local history_size = ARGV[3]
local history_ttl = tonumber(ARGV[4])
local marker_ttl = tonumber(ARGV[5])
local bucket_size = tonumber(ARGV[6])
local count = (#ARGV - 6) / 3
local first = redis.call('HINCRBY', meta, 'seq', count) - count + 1
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local now_ms = now * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bucket = math.floor(now / bucket_size)
if tonumber(redis.call('HGET', meta, 'bucket') or -1) ~= bucket then
  -- every seq up to first - 1 was given out before now
  local checkpoints = prefix .. epoch .. ':clock'
  redis.call('HSET', meta, 'bucket', bucket)
  redis.call('ZADD', checkpoints, now, first - 1)
  redis.call('ZREMRANGEBYSCORE', checkpoints, '-inf', '(' .. (now - marker_ttl))
  redis.call('EXPIRE', checkpoints, marker_ttl + 2 * bucket_size)
end
-- Drop entries older than the history TTL (a few per publish), so an active stream keeps only
-- what can still be replayed. The `p` of the first kept entry then names the last one dropped.
local horizon = now_ms - history_ttl
local function stamp(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return tonumber(fields[i + 1]) end
  end
  return 0
end
local function publish(seq, uid, kind, head)
  local stream, last, channel, ulen
  if kind == '1' then
    stream = prefix .. epoch .. ':u:' .. uid
    last = prefix .. epoch .. ':l:' .. uid
    channel = prefix .. 'u:' .. uid
    ulen = string.len(uid)
  elseif kind == '2' or kind == '3' then
    stream = prefix .. epoch .. ':c:' .. uid
    last = prefix .. epoch .. ':lc:' .. uid
    channel = prefix .. 'c:' .. uid
    ulen = 'c' .. string.len(uid)
    if kind == '3' then
      -- The channel's state: no TTL, replaced by the next retained event.
      redis.call('HSET', prefix .. 'retained:' .. uid, 'e', epoch, 's', seq, 't', now_ms, 'h', head)
    end
  else
    stream = prefix .. epoch .. ':all'
    last = prefix .. epoch .. ':lall'
    channel = prefix .. 'all'
    ulen = -1
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
  redis.call('XADD', stream, 'MAXLEN', '~', history_size, seq .. '-0', 'h', head, 'p', prev, 't', now_ms)
  redis.call('PEXPIRE', stream, history_ttl)
  redis.call('SET', last, seq, 'EX', marker_ttl)
  -- The publish time rides along, for the lag metric of the nodes that deliver it.
  redis.call('PUBLISH', channel, epoch .. '|' .. seq .. '|' .. now_ms .. '|' .. ulen .. '|' .. uid .. head)
end
for i = 0, count - 1 do
  local at = 7 + 3 * i
  publish(first + i, ARGV[at], ARGV[at + 1], ARGV[at + 2])
end
return {epoch, first, now_ms}
