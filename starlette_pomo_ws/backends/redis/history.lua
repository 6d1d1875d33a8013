-- KEYS[1]: the metadata hash. ARGV: candidate epoch, prefix, since epoch, since seq, until seq (0: now),
-- history ttl (ms), marker ttl (s), clock margin (s), include the broadcast stream ('1'/'0'), the number of
-- user ids, the user ids, then channel names. All the streams are read in one step, so they meet exactly.
-- Returns {epoch, seq, complete, {seq, head, milliseconds, ...} per stream (broadcast, users, channels)}.
local prefix = ARGV[2]
local seq = tonumber(redis.call('HGET', meta, 'seq'))
local since = tonumber(ARGV[4])
if ARGV[3] ~= epoch or since > seq then
  return {epoch, seq, 0}
end
local upto = tonumber(ARGV[5])
if upto <= 0 or upto > seq then
  upto = seq
end
local clock = redis.call('TIME')
local now = tonumber(clock[1])
local horizon = now * 1000 + math.floor(tonumber(clock[2]) / 1000) - tonumber(ARGV[6])
local watermark = nil
local function lowest_known()
  -- Markers of streams whose last event is above this seq have not expired yet.
  if watermark == nil then
    local young = redis.call('ZRANGEBYSCORE', prefix .. epoch .. ':clock',
      '(' .. (now - tonumber(ARGV[7]) + tonumber(ARGV[8])), '+inf', 'LIMIT', 0, 1)
    if young[1] then watermark = tonumber(young[1]) else watermark = seq end
  end
  return watermark
end
local function read(stream, last)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if first[1] == nil then
    local newest = redis.call('GET', last)
    if newest then
      if tonumber(newest) > since then return nil end
    elseif since < lowest_known() then
      return nil
    end
    return {}
  end
  local fields = first[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and tonumber(fields[i + 1]) > since then return nil end
  end
  local out = {}
  if since >= upto then return out end
  for _, entry in ipairs(redis.call('XRANGE', stream, '(' .. since .. '-0', upto .. '-0')) do
    local head, stamp
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'h' then head = f[i + 1] elseif f[i] == 't' then stamp = tonumber(f[i + 1]) end
    end
    if stamp < horizon then return nil end
    out[#out + 1] = string.sub(entry[1], 1, -3)
    out[#out + 1] = head
    out[#out + 1] = stamp
  end
  return out
end
local result = {epoch, upto, 1}
if ARGV[9] == '1' then
  local records = read(prefix .. epoch .. ':all', prefix .. epoch .. ':lall')
  if records == nil then return {epoch, seq, 0} end
  result[#result + 1] = records
end
local users = 10 + tonumber(ARGV[10])
for i = 11, #ARGV do
  local records
  if i <= users then
    records = read(prefix .. epoch .. ':u:' .. ARGV[i], prefix .. epoch .. ':l:' .. ARGV[i])
  else
    records = read(prefix .. epoch .. ':c:' .. ARGV[i], prefix .. epoch .. ':lc:' .. ARGV[i])
  end
  if records == nil then return {epoch, seq, 0} end
  result[#result + 1] = records
end
return result
