-- Channel membership, for a batch of updates and counts. Each node writes its own counts as absolute
-- values into its hash `Pmembers:<node>` (field `<channel>|<user>`), and the difference goes into the
-- cluster-wide `Pcm:<channel>` (user -> connections) and `Pcs` (channel -> connections), so that a count
-- costs one read however many nodes there are. A write that is repeated (its answer was lost) changes nothing.
-- KEYS[1]: the set of nodes with members (score: when the node expires). ARGV: prefix, ttl (ms), the number
-- of nodes written, then per node: its id, '1' when this is the node's whole view (members it does not list
-- are removed, and the hash is marked complete with the field '#') else '0', the number of members, and that
-- many (channel, user, connections) triples; then (channel, user) pairs to count.
-- Returns {{connections of the user in the channel, users in the channel} per pair, {channel, user, '1'
-- joined / '0' left, users in the channel} per change that a whole view made to the cluster counts}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local prefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local totals = prefix .. 'cs'
local changes = {}
local function set(key, field, channel, user, count, whole)
  local old = tonumber(redis.call('HGET', key, field) or '0')
  if count == old then return end
  if count > 0 then redis.call('HSET', key, field, count) else redis.call('HDEL', key, field) end
  local members = prefix .. 'cm:' .. channel
  local delta = count - old
  local after = redis.call('HINCRBY', members, user, delta)
  if after <= 0 then redis.call('HDEL', members, user) end
  if redis.call('HINCRBY', totals, channel, delta) <= 0 then redis.call('HDEL', totals, channel) end
  if whole then
    local before = after - delta
    local joined = nil
    if before <= 0 and after > 0 then joined = '1' elseif before > 0 and after <= 0 then joined = '0' end
    if joined then
      changes[#changes + 1] = channel
      changes[#changes + 1] = user
      changes[#changes + 1] = joined
      changes[#changes + 1] = redis.call('HLEN', members)
    end
  end
end
local at = 4
for _ = 1, tonumber(ARGV[3]) do
  local node = ARGV[at]
  local whole = ARGV[at + 1] == '1'
  local count = tonumber(ARGV[at + 2])
  local key = prefix .. 'members:' .. node
  at = at + 3
  local listed = {}
  for i = at, at + 3 * count - 1, 3 do
    listed[ARGV[i] .. '|' .. ARGV[i + 1]] = true
  end
  if whole then
    local fields = redis.call('HKEYS', key)
    for _, field in ipairs(fields) do
      local bar = string.find(field, '|', 1, true)
      if bar and not listed[field] then
        set(key, field, string.sub(field, 1, bar - 1), string.sub(field, bar + 1), 0, true)
      end
    end
  end
  for _ = 1, count do
    set(key, ARGV[at] .. '|' .. ARGV[at + 1], ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), whole)
    at = at + 3
  end
  if whole then redis.call('HSET', key, '#', '1') end
  redis.call('ZADD', KEYS[1], now + ttl, node)
end
local counts = {}
for i = at, #ARGV, 2 do
  counts[#counts + 1] = tonumber(redis.call('HGET', prefix .. 'cm:' .. ARGV[i], ARGV[i + 1]) or '0')
  counts[#counts + 1] = redis.call('HLEN', prefix .. 'cm:' .. ARGV[i])
end
return {counts, changes}
