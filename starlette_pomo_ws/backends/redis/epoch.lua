-- Shared by the scripts that take KEYS[1] = the metadata hash and ARGV[1] = a candidate epoch: find the
-- epoch, and start a new one when the history can no longer be trusted.
--  * The metadata is gone (a flush, a restart without persistence, an eviction).
--  * This server is a replica that was promoted (Sentinel failover) since the last script ran: its
--    `master_replid2` is the replication id this hash recorded. Replication is asynchronous, so the old
--    primary may have acknowledged events that never reached this one, and their seqs would be given out
--    again. A candidate that starts with '=' says every acknowledged event waited for replicas (`WAIT`):
--    then a promotion keeps the epoch.
local meta = KEYS[1]
local candidate = ARGV[1]
local trust_replicas = string.sub(candidate, 1, 1) == '='
if trust_replicas then candidate = string.sub(candidate, 2) end
local replication = redis.call('INFO', 'replication')
local replid = string.match(replication, 'master_replid:(%w+)')
local epoch = redis.call('HGET', meta, 'epoch')
if epoch then
  local known = redis.call('HGET', meta, 'replid')
  if known ~= replid then
    if known and not trust_replicas and string.match(replication, 'master_replid2:(%w+)') == known then
      epoch = false
    else
      redis.call('HSET', meta, 'replid', replid)
    end
  end
end
if not epoch then
  epoch = candidate
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'bucket', -1, 'replid', replid)
end
