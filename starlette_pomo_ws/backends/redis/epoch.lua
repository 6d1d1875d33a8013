-- Shared by the scripts that take KEYS[1] = the metadata hash and ARGV[1] = a candidate epoch:
-- find the epoch, starting a new one when the metadata is gone (a flush, a restart without persistence).
local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'bucket', -1)
end
