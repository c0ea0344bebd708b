"""The Lua scripts behind every Redis write: each change is one atomic script that also publishes it.

Every script gets the same keys, so callers build them in one place:
KEYS[1] the task hash, KEYS[2] the task's prompt bytes (hash: version -> safetensors), KEYS[3] the tenant's
task set, KEYS[4] the tenant set, KEYS[5] the "populated" marker (a sorted set, see below), KEYS[6] the tenant's
task index (a sorted set, every score 0, so its members are in byte order: listings page through it with
ZRANGEBYLEX); then per script.
ARGV[1] the change channel, ARGV[2] tenant, ARGV[3] task id, ARGV[4] the deadline; then per script.

The deadline (microseconds on Redis' own clock, read with TIME just before the call) makes a write's answer
the truth: a script that Redis runs after it (the call timed out, Redis was stalled or paused meanwhile)
changes nothing. The client waits a whole timeout longer than the deadline for the reply, so a script that
ran in time is answered, and one that was answered 503 never takes effect later. (What no protocol can
rule out: Redis stalling between running a script and sending its reply for longer than that; then the
change is made though answered 503, and reconciliation still keeps every mirror equal to Redis.)
Comparing Redis' clock with itself needs no clock sync between hosts. Every change is stamped with that
same clock (`updated_at`), so stamps from several writers are ordered.

Prompt bytes are staged first under a key of their own (with an expiry) and only referenced here, so the
script's arguments stay small whatever the prompt's size; a refused script leaves the staged bytes to expire.

The marker (a sorted set) also indexes changes for the disk mirrors, which copy just what changed since
they last synced: `epoch:<id>` (score 0: a new id each time Redis is (re)populated), `task:<tenant>/<task>`
(score: the generation, a count of changes, of the task's last change), `deleted:<tenant>/<task>` (score:
minus the generation of its delete). Only the newest deletes are kept (a tenant that creates and deletes
tasks without end cannot grow it without end); `pruned:<generation>` (score 0) says up to where older ones
were dropped: a mirror synced before that compares every task instead.

Writes refuse to run while the marker is missing (Redis lost its data and has not been rebuilt from the
disk mirror yet), so a write can never start a task's versions over on top of a lost history.
Every check comes before the first change: a script that fails changes nothing (Redis has no rollback).
"""

from __future__ import annotations

UNPOPULATED = "UNPOPULATED"
NO_TASK = "NOTASK"
NO_VERSION = "NOVERSION"
LATE = "LATE"
NOT_STAGED = "NOTSTAGED"
MAX_DELETE_RECORDS = 10_000

_COMMON = f"""
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[4]) then
  return redis.error_reply('{LATE} the change reached Redis after its deadline')
end
local stamp = string.format('%d.%06d', now[1], now[2])
local function notify(event, version)
  redis.call('PUBLISH', ARGV[1], cjson.encode({{
    event = event, tenant = ARGV[2], task_id = ARGV[3], version = version, updated_at = stamp}}))
end
local function require_populated()
  if redis.call('EXISTS', KEYS[5]) == 0 then
    return redis.error_reply('{UNPOPULATED} the registry is being rebuilt from its disk mirror')
  end
end
local function index_entry(kind, name, score)
  redis.call('ZREM', KEYS[5], (kind == 'task:' and 'deleted:' or 'task:') .. name)
  redis.call('ZADD', KEYS[5], score, kind .. name)
end
local function prune_deletes()
  local count = redis.call('ZCOUNT', KEYS[5], '-inf', '(0')
  if count <= {MAX_DELETE_RECORDS} then return end
  local oldest_kept = redis.call('ZREVRANGEBYSCORE', KEYS[5], '(0', '-inf', 'WITHSCORES', 'LIMIT', math.floor(count / 2), 1)
  local cut = -tonumber(oldest_kept[2]) - 1
  redis.call('ZREMRANGEBYSCORE', KEYS[5], -cut, '(0')
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], 0, 0)) do
    if string.sub(member, 1, 7) == 'pruned:' then redis.call('ZREM', KEYS[5], member) end
  end
  redis.call('ZADD', KEYS[5], 0, 'pruned:' .. cut)
end
local function record_change(deleted)
  local top = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')
  local bottom = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  local generation = math.max(tonumber(top[2]), -tonumber(bottom[2])) + 1
  local name = ARGV[2] .. '/' .. ARGV[3]
  if deleted then
    index_entry('deleted:', name, -generation)
    prune_deletes()
  else
    index_entry('task:', name, generation)
  end
end
"""

# KEYS[7] the staged prompt bytes. ARGV[5] version info JSON (without the version), ARGV[6] '1' to activate,
# ARGV[7..] metadata field/value pairs to set.
ADD_VERSION = (
    _COMMON
    + f"""
local refused = require_populated()
if refused then return refused end
local data = redis.call('GET', KEYS[7])
if not data then return redis.error_reply('{NOT_STAGED} the prompt bytes expired before the change ran') end
record_change()
local v = redis.call('HINCRBY', KEYS[1], 'last_version', 1)
redis.call('HSET', KEYS[2], v, data)
redis.call('DEL', KEYS[7])
redis.call('HSET', KEYS[1], 'version:' .. v, ARGV[5], 'updated_at', stamp)
redis.call('HSETNX', KEYS[1], 'created_at', stamp)
if ARGV[6] == '1' or redis.call('HEXISTS', KEYS[1], 'active_version') == 0 then
  redis.call('HSET', KEYS[1], 'active_version', v)
end
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[6], 0, ARGV[3])
redis.call('SADD', KEYS[4], ARGV[2])
notify('version', v)
return redis.call('HGETALL', KEYS[1])
"""
)

# ARGV[5] the version to activate.
ACTIVATE = (
    _COMMON
    + f"""
local refused = require_populated()
if refused then return refused end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('{NO_TASK}') end
if redis.call('HEXISTS', KEYS[1], 'version:' .. ARGV[5]) == 0 then return redis.error_reply('{NO_VERSION}') end
record_change()
redis.call('HSET', KEYS[1], 'active_version', ARGV[5], 'updated_at', stamp)
notify('activate', tonumber(ARGV[5]))
return redis.call('HGETALL', KEYS[1])
"""
)

# ARGV[5] the ensemble as JSON (`[]` clears it), ARGV[6..] its versions, each checked first. A missing one is
# named in the error (`NOVERSION <n>`).
SET_ENSEMBLE = (
    _COMMON
    + f"""
local refused = require_populated()
if refused then return refused end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('{NO_TASK}') end
for i = 6, #ARGV do
  if redis.call('HEXISTS', KEYS[1], 'version:' .. ARGV[i]) == 0 then
    return redis.error_reply('{NO_VERSION} ' .. ARGV[i])
  end
end
record_change()
if #ARGV >= 6 then
  redis.call('HSET', KEYS[1], 'ensemble', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'ensemble')
end
redis.call('HSET', KEYS[1], 'updated_at', stamp)
notify('ensemble', nil)
return redis.call('HGETALL', KEYS[1])
"""
)

# Returns the stamp of the delete.
DELETE_TASK = (
    _COMMON
    + f"""
local refused = require_populated()
if refused then return refused end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('{NO_TASK}') end
record_change(true)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[3])
notify('delete', nil)
return stamp
"""
)

# Rebuild: writes a whole task from the mirror unless Redis already has it (then returns 0). It runs before
# the marker exists, so it records no change: the new epoch makes every mirror compare everything anyway.
# KEYS[7..] the staged bytes of each version; ARGV[5] the number of task hash field/value pairs n;
# ARGV[6 .. 5+2n] those pairs; then the version number of each staged key, in the same order.
RESTORE_TASK = (
    _COMMON
    + f"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
  return 0
end
local n = tonumber(ARGV[5])
local blobs = {{}}
for i = 7, #KEYS do
  blobs[i] = redis.call('GET', KEYS[i])
  if not blobs[i] then return redis.error_reply('{NOT_STAGED} the prompt bytes expired before the rebuild ran') end
end
for i = 6, 5 + 2 * n, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 7, #KEYS do
  redis.call('HSET', KEYS[2], ARGV[2 * n + i - 1], blobs[i])
  redis.call('DEL', KEYS[i])
end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[6], 0, ARGV[3])
redis.call('SADD', KEYS[4], ARGV[2])
notify('restore', nil)
return 1
"""
)

# KEYS[1] the marker. A marker from before it held the change index was a plain string (its value the epoch).
UPGRADE_MARKER = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return 0 end
local epoch = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[1], 0, 'epoch:' .. epoch)
return 1
"""

# KEYS[1] a tenant's task set, KEYS[2] its task index. Rebuilds the index from the set: for a tenant whose tasks
# were written before the index existed (or by a replica that predates it), so the two disagree.
INDEX_TASKS = """
redis.call('DEL', KEYS[2])
for _, task_id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('ZADD', KEYS[2], 0, task_id)
end
return redis.call('ZCARD', KEYS[2])
"""
