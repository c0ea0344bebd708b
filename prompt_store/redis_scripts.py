"""The Lua scripts behind every Redis write: each change is one atomic script that also publishes it.

Every script gets the same keys, so callers build them in one place:
KEYS[1] the task hash, KEYS[2] the task's prompt bytes (hash: version -> safetensors), KEYS[3] the tenant's
task set, KEYS[4] the tenant set, KEYS[5] the "populated" marker.
ARGV[1] the change channel, ARGV[2] tenant, ARGV[3] task id, ARGV[4] the change time; then per script.

Writes refuse to run while the marker is missing (Redis lost its data and has not been rebuilt from the
disk mirror yet), so a write can never start a task's versions over on top of a lost history.
"""

from __future__ import annotations

UNPOPULATED = "UNPOPULATED"
NO_TASK = "NOTASK"
NO_VERSION = "NOVERSION"

_COMMON = f"""
local function notify(event, version)
  redis.call('PUBLISH', ARGV[1], cjson.encode({{
    event = event, tenant = ARGV[2], task_id = ARGV[3], version = version, updated_at = ARGV[4]}}))
end
local function require_populated()
  if redis.call('EXISTS', KEYS[5]) == 0 then
    return redis.error_reply('{UNPOPULATED} the registry is being rebuilt from its disk mirror')
  end
end
"""

# ARGV[5] prompt bytes, ARGV[6] version info JSON (without the version), ARGV[7] '1' to activate,
# ARGV[8..] metadata field/value pairs to set.
ADD_VERSION = (
    _COMMON
    + """
local refused = require_populated()
if refused then return refused end
local v = redis.call('HINCRBY', KEYS[1], 'last_version', 1)
redis.call('HSET', KEYS[2], v, ARGV[5])
redis.call('HSET', KEYS[1], 'version:' .. v, ARGV[6], 'updated_at', ARGV[4])
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[4])
if ARGV[7] == '1' or redis.call('HEXISTS', KEYS[1], 'active_version') == 0 then
  redis.call('HSET', KEYS[1], 'active_version', v)
end
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('SADD', KEYS[3], ARGV[3])
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
redis.call('HSET', KEYS[1], 'active_version', ARGV[5], 'updated_at', ARGV[4])
notify('activate', tonumber(ARGV[5]))
return redis.call('HGETALL', KEYS[1])
"""
)

DELETE_TASK = (
    _COMMON
    + f"""
local refused = require_populated()
if refused then return refused end
if redis.call('DEL', KEYS[1]) == 0 then return redis.error_reply('{NO_TASK}') end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
notify('delete', nil)
return 1
"""
)

# Rebuild: writes a whole task from the mirror unless Redis already has it (then returns 0).
# ARGV[5] the number of task hash field/value pairs n; ARGV[6 .. 5+2n] those pairs; then version/bytes pairs.
RESTORE_TASK = (
    _COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 6 + 2 * n, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[2])
notify('restore', nil)
return 1
"""
)
