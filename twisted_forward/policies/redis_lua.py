"""
The Lua scripts that keep the policy counters in Redis (or Valkey).

Each policy check is one run of :data:`RESERVE`: every bucket of the
request is checked and, only if all have room, all are charged, in one atomic
step on the server, so several proxy instances sharing one Redis can never
together let more through than the limit.  Settling and releasing is one
``EVALSHA`` of :data:`ADJUST`.  The store sends many of both at once, in
one ``EVALSHA`` of :data:`BATCH`, which applies them in order.

Three kinds of bucket, one letter each in the scripts' arguments:

``f`` — a fixed window: one counter per window (``INCRBYFLOAT``), named
    ``<key>:<window start in ms>``, expiring with ``PEXPIRE`` when the window
    is over.  A window is either ``window_ms`` long and aligned on multiples
    of it, or (``window_ms`` 0) the explicit period ``[start_ms, end_ms)``
    the caller gives (a calendar day or month).
``m`` — a moving window: a sorted set of the charges made in the last
    ``window_ms``, each member ``<reservation id>:<amount>`` scored by its
    time; older members are dropped on every check.
``c`` — a concurrency counter: a sorted set of leases, each member
    ``<reservation id>#<n>`` scored by the time it expires.  Its holder
    renews it (:data:`RENEW`) while the request runs, so the lease of a
    process that died ends by itself ``lease_ms`` later.

Time: every script takes ``now`` in milliseconds as its first argument; an
empty string means the Redis server's own clock (``TIME``), which is what
the proxy uses, so instances on several machines agree on windows even if
their clocks do not.  Tests pass their own ``now`` to move time at will.

Numbers come back as strings where they can be fractional (USD amounts):
Redis turns a Lua number reply into an integer.
"""

from __future__ import annotations

#: Shared helpers, prepended to every script.
_PRELUDE = r"""
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function amount_of(member)
  return tonumber(string.match(member, ':([^:]*)$')) or 0
end
local function ms(x)
  return string.format('%d', x)
end
"""

#: The reservation and adjustment steps, as functions, shared by
#: :data:`RESERVE`, :data:`ADJUST` and :data:`BATCH`.
_STEPS = r"""
-- Check every bucket and charge all of them, or none.
-- K[koff + i]: bucket i's key; A[aoff + (i - 1) * 6 + 1 .. 6]: its kind,
-- window_ms (for c the lease), limit, amount, start_ms, end_ms.
-- Returns refused (0 if granted), retry_ms, and per bucket used, reset_ms
-- and tag.
local function reserve(now, rid, K, koff, A, aoff, n)
  local F = 6
  local keys, used, resets, tags = {}, {}, {}, {}
  local refused, retry = 0, 0
  for i = 1, n do
    local o = aoff + (i - 1) * F
    local kind = A[o + 1]
    local window = tonumber(A[o + 2])
    local limit = tonumber(A[o + 3])
    local amount = tonumber(A[o + 4])
    local u, reset, wait = 0, 0, 0
    if kind == 'f' then
      local start, stop
      if window > 0 then
        start = math.floor(now / window) * window
        stop = start + window
      else
        start = tonumber(A[o + 5])
        stop = tonumber(A[o + 6])
      end
      tags[i] = ms(start)
      keys[i] = K[koff + i] .. ':' .. tags[i]
      u = tonumber(redis.call('GET', keys[i]) or '0')
      reset = stop - now
      wait = reset
    elseif kind == 'm' then
      keys[i] = K[koff + i]
      tags[i] = ''
      redis.call('ZREMRANGEBYSCORE', keys[i], '-inf', now - window)
      local entries = redis.call('ZRANGE', keys[i], 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        u = u + amount_of(entries[j])
      end
      if #entries > 0 then
        reset = tonumber(entries[#entries]) + window - now
      elseif amount > 0 then
        reset = window
      end
      wait = window
      local over = u + amount - limit
      if over > 0 then
        -- The oldest charges leave first: wait until enough of them have.
        local freed = 0
        for j = 1, #entries, 2 do
          freed = freed + amount_of(entries[j])
          if freed >= over and u - freed < limit then
            wait = tonumber(entries[j + 1]) + window - now
            break
          end
        end
      end
    elseif kind == 'c' then
      keys[i] = K[koff + i]
      tags[i] = ''
      redis.call('ZREMRANGEBYSCORE', keys[i], '-inf', now)
      u = redis.call('ZCARD', keys[i])
      reset = 0
      wait = 1000
    else
      error('unknown bucket kind ' .. tostring(kind))
    end
    used[i] = u
    resets[i] = reset
    if refused == 0 and (u + amount > limit or u >= limit) then
      refused = i
      retry = wait
    end
  end
  if refused == 0 then
    for i = 1, n do
      local o = aoff + (i - 1) * F
      local kind = A[o + 1]
      local amount = tonumber(A[o + 4])
      if kind == 'f' then
        if amount ~= 0 then
          redis.call('INCRBYFLOAT', keys[i], A[o + 4])
          if redis.call('PTTL', keys[i]) < 0 then
            redis.call('PEXPIRE', keys[i], math.max(1, math.ceil(resets[i])) + 1000)
          end
        end
      elseif kind == 'm' then
        if amount > 0 then
          redis.call('ZADD', keys[i], now, rid .. ':' .. A[o + 4])
        end
        redis.call('PEXPIRE', keys[i], tonumber(A[o + 2]))
      else
        local lease = tonumber(A[o + 2])
        for j = 1, amount do
          redis.call('ZADD', keys[i], now + lease, rid .. '#' .. j)
        end
        redis.call('PEXPIRE', keys[i], lease)
      end
      used[i] = used[i] + amount
    end
  end
  return refused, retry, used, resets, tags
end

-- Change what a reservation charged.
-- K[koff + i]: bucket i's key; A[aoff + (i - 1) * 4 + 1 .. 4]: its kind,
-- tag, old amount, new amount.
local function adjust(rid, K, koff, A, aoff, n)
  local F = 4
  for i = 1, n do
    local o = aoff + (i - 1) * F
    local key0 = K[koff + i]
    local kind = A[o + 1]
    local tag = A[o + 2]
    local old, new = A[o + 3], A[o + 4]
    if kind == 'f' then
      local key = key0 .. ':' .. tag
      if redis.call('EXISTS', key) == 1 then
        local value = tonumber(redis.call('INCRBYFLOAT', key, tonumber(new) - tonumber(old)))
        if value < 0 then
          redis.call('SET', key, '0', 'KEEPTTL')
        end
      end
    elseif kind == 'm' then
      local score = redis.call('ZSCORE', key0, rid .. ':' .. old)
      if score then
        redis.call('ZREM', key0, rid .. ':' .. old)
        if tonumber(new) > 0 then
          redis.call('ZADD', key0, score, rid .. ':' .. new)
        end
      end
    elseif kind == 'c' then
      local was, now_count = tonumber(old), tonumber(new)
      for j = now_count + 1, was do
        redis.call('ZREM', key0, rid .. '#' .. j)
      end
    end
  end
end
"""

#: Fields per bucket in :data:`RESERVE`'s arguments.
RESERVE_FIELDS = 6

#: Check every bucket and charge all of them, or none.
#:
#: KEYS[i]: bucket i's key (a prefix for ``f`` buckets).
#: ARGV: now_ms, reservation id, then per bucket kind, window_ms (for
#: ``c`` the lease), limit, amount, start_ms, end_ms.
#:
#: Returns ``{granted, refused_index, retry_ms, now_ms, used_1, reset_ms_1,
#: tag_1, ...}``: granted 1 or 0; the 1-based index of the first bucket that
#: had no room (0 if granted); how long until it would have room; then per
#: bucket its use (after the charge if granted), the time until its window
#: resets, and a tag that :data:`ADJUST` needs (the window start of ``f``).
RESERVE = _PRELUDE + _STEPS + r"""
local now = now_ms(ARGV[1])
local n = #KEYS
local refused, retry, used, resets, tags = reserve(now, ARGV[2], KEYS, 0, ARGV, 2, n)
local out = {refused == 0 and 1 or 0, refused, math.ceil(retry), ms(now)}
for i = 1, n do
  out[#out + 1] = tostring(used[i])
  out[#out + 1] = math.ceil(resets[i])
  out[#out + 1] = tags[i]
end
return out
"""

#: Fields per bucket in :data:`ADJUST`'s arguments.
ADJUST_FIELDS = 4

#: Change what a reservation charged: settle it with the real amount, or
#: release it (new amount 0).
#:
#: KEYS[i]: bucket i's key, as given to :data:`RESERVE`.
#: ARGV: reservation id, then per bucket kind, tag (from RESERVE),
#: old amount, new amount — the amounts exactly as last sent, as strings.
#:
#: A window that is already over is left alone: its charge no longer limits
#: anyone.  A counter never goes below zero.
ADJUST = _PRELUDE + _STEPS + r"""
adjust(ARGV[1], KEYS, 0, ARGV, 1, #KEYS)
return #KEYS
"""

#: Many reservations and adjustments in one call, applied in order, each
#: exactly as :data:`RESERVE` or :data:`ADJUST` would (the whole call is one
#: atomic step, so the order within it is the order they happened in).
#:
#: KEYS: the bucket keys the operations use, each once.
#: ARGV: one string per operation, its fields separated by spaces (one
#: argument an operation, not thirty: the client encodes each argument on
#: its own, in Python):
#:
#: - ``r <reservation id> <now_ms> <count>`` then per bucket ``<key index>
#:   <kind> <window_ms> <limit> <amount> <start_ms> <end_ms>``
#:   (:data:`RESERVE`'s fields, the key by its 1-based index in KEYS);
#: - ``a <reservation id> <count>`` then per bucket ``<key index> <kind>
#:   <tag> <old amount> <new amount>`` (:data:`ADJUST`'s; ``-`` for an
#:   empty tag).
#:
#: Returns one status reply (a single line) per operation: for ``r``,
#: ``"granted refused_index retry_ms used_1 reset_ms_1 used_2 reset_ms_2
#: ..."``; for ``a``, ``"0"``.  Status lines, not bulk strings: txredisapi's
#: pure-Python reader (used when hiredis is not installed) reads each bulk
#: string of a reply on a reactor turn of its own (it pauses and reschedules
#: itself after every one), so a reply of 200 bulk strings would take 200
#: turns of a busy reactor to read; lines are read all at once.
BATCH = _PRELUDE + _STEPS + r"""
local out = {}
for a = 1, #ARGV do
  local f = {}
  for field in string.gmatch(ARGV[a], '%S+') do
    f[#f + 1] = field
  end
  local op, rid = f[1], f[2]
  local keys, fields = {}, {}
  if op == 'r' then
    local now = now_ms(f[3])
    local n = tonumber(f[4])
    for i = 1, n do
      local o = 4 + (i - 1) * 7
      keys[i] = KEYS[tonumber(f[o + 1])]
      for j = 2, 7 do
        fields[#fields + 1] = f[o + j]
      end
    end
    local refused, retry, used, resets = reserve(now, rid, keys, 0, fields, 0, n)
    local parts = {refused == 0 and 1 or 0, refused, math.ceil(retry)}
    for i = 1, n do
      parts[#parts + 1] = tostring(used[i])
      parts[#parts + 1] = math.ceil(resets[i])
    end
    out[#out + 1] = redis.status_reply(table.concat(parts, ' '))
  elseif op == 'a' then
    local n = tonumber(f[3])
    for i = 1, n do
      local o = 3 + (i - 1) * 5
      keys[i] = KEYS[tonumber(f[o + 1])]
      fields[#fields + 1] = f[o + 2]
      local tag = f[o + 3]
      fields[#fields + 1] = tag == '-' and '' or tag
      fields[#fields + 1] = f[o + 4]
      fields[#fields + 1] = f[o + 5]
    end
    adjust(rid, keys, 0, fields, 0, n)
    out[#out + 1] = redis.status_reply('0')
  else
    error('unknown operation ' .. tostring(op))
  end
end
return out
"""

#: Extend the leases of requests still running.
#:
#: KEYS[i]: a concurrency bucket's key.
#: ARGV: now_ms, then per key the reservation id, its count and lease_ms.
#: Only leases still held are extended (``ZADD XX``): one that ended is not
#: brought back.
RENEW = _PRELUDE + r"""
local now = now_ms(ARGV[1])
for i = 1, #KEYS do
  local rid = ARGV[3 * i - 1]
  local count = tonumber(ARGV[3 * i])
  local lease = tonumber(ARGV[3 * i + 1])
  for j = 1, count do
    redis.call('ZADD', KEYS[i], 'XX', now + lease, rid .. '#' .. j)
  end
  redis.call('PEXPIRE', KEYS[i], lease)
end
return #KEYS
"""

#: Record a default key's health for every instance.
#:
#: KEYS[1]: the health hash; KEYS[2]: its version counter.
#: ARGV: key id (a hash of the key, never the key), state (``revoked`` or
#: ``rest``), until (epoch seconds, for ``rest``), ttl_ms of the record.
#: Returns the new version.
HEALTH_SET = _PRELUDE + r"""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
local version = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return version
"""

#: Read the default keys' health if it changed since ``version``.
#:
#: KEYS[1]: the health hash; KEYS[2]: its version counter.
#: ARGV: the version the caller has.
#: Returns ``{version}`` when nothing changed, else
#: ``{version, id_1, state_1, ...}``.
HEALTH_GET = _PRELUDE + r"""
local version = redis.call('GET', KEYS[2]) or '0'
if version == ARGV[1] then
  return {version}
end
local out = {version}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all do
  out[#out + 1] = all[j]
end
return out
"""
