"""The Lua scripts of the Redis idempotency store (``oncely.stores.redis``): one per transition,
and ``BATCH``, which runs any number of transitions on keys of one slot in one call.

A key's state is one hash, ``KEYS[1]``, with the fields

- ``s``: ``r`` while a lease runs, ``c`` once completed;
- ``t``: the lease token (kept after completion, so a retried ``complete`` is recognised);
- ``u``: the lease's end, in milliseconds of the server clock (read only while ``s`` is ``r``;
  a completed key keeps it, unread);
- ``f``: the payload fingerprint;
- ``r``: the result, absent when the handler returned nothing.

The key's TTL does the forgetting: a running key lives for its lease plus ``STALE_LEASE_GRACE``
(the script itself decides, by ``u``, whether the lease still holds), a completed key for the
result's ttl. Time comes from ``TIME`` in the script, so every client shares the clock of the
server that holds the key, whatever its own clock says.

Every script is idempotent for its token: a client that sends one twice (redis-py retries a
command whose reply was lost to a broken connection) gets the same answer the second time,
and changes nothing more. So ``begin`` with the token it granted is ``NEW`` again, and
``complete`` of a key its token already completed succeeds. Replies are never empty or zero:
redis-py's cluster pipeline re-sends a command whose result is falsy when it retries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

STALE_LEASE_GRACE_MS = 3_600_000
"""How long a running key outlives its lease, in ms, before Redis deletes it.

Until then a slow owner whose lease ran out, and that nobody took over, may still renew or
complete (as with the memory and SQLite stores); afterwards it gets ``LeaseLost``. A crashed
worker's lease still ends on time: ``begin`` compares ``u`` with the server clock.
"""

# Redis 5 and 6 replicate a script verbatim unless told otherwise, and refuse writes after
# TIME in that mode; Redis 7 always replicates effects and ignores the call.
_PREAMBLE = """
redis.replicate_commands()
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# One Lua function per transition; the single-key scripts and the batch script run the same
# ones, so a transition means the same whichever way it is sent.
_TRANSITIONS = """
-- fingerprint, token, lease ms, key ttl ms (lease + grace).
-- Reply: {0} NEW, {1, ms left} IN_PROGRESS, {2, result or nil} COMPLETED, {3} MISMATCH.
local function begin_(key, fp, token, lease, ttl)
    local h = redis.call('HMGET', key, 's', 'f', 'u', 'r', 't')
    if h[1] == 'c' then
        if h[2] ~= fp then return {3} end
        return {2, h[4]}
    end
    if h[1] == 'r' then
        if h[5] == token then return {0} end
        local left = tonumber(h[3]) - now
        if left > 0 then
            if h[2] ~= fp then return {3} end
            return {1, left}
        end
        redis.call('DEL', key)
    end
    redis.call('HSET', key, 's', 'r', 't', token, 'f', fp,
        'u', string.format('%.0f', now + tonumber(lease)))
    redis.call('PEXPIRE', key, ttl)
    return {0}
end

-- token, lease ms, key ttl ms. Reply: {1} renewed, {0} lease lost.
local function renew_(key, token, lease, ttl)
    local h = redis.call('HMGET', key, 's', 't')
    if h[1] ~= 'r' or h[2] ~= token then return {0} end
    redis.call('HSET', key, 'u', string.format('%.0f', now + tonumber(lease)))
    redis.call('PEXPIRE', key, ttl)
    return {1}
end

-- token, result ttl ms, '1' if a result follows else '0', result.
-- Reply: {1} completed (now or by this token before), {0} lease lost.
local function complete_(key, token, ttl, has, result)
    local h = redis.call('HMGET', key, 's', 't')
    if h[2] ~= token then return {0} end
    if h[1] == 'c' then return {1} end
    -- One HSET: a running key holds no 'r' (begin writes it afresh), and its 'u' is left,
    -- unread once 's' is 'c'. Each redis.call costs the server more than its work here.
    if has == '1' then
        redis.call('HSET', key, 's', 'c', 'r', result)
    else
        redis.call('HSET', key, 's', 'c')
    end
    redis.call('PEXPIRE', key, ttl)
    return {1}
end

-- token. Reply: {1} released, {0} not held by this token (ignored).
local function release_(key, token)
    local h = redis.call('HMGET', key, 's', 't')
    if h[1] ~= 'r' or h[2] ~= token then return {0} end
    redis.call('DEL', key)
    return {1}
end
"""

_HEAD = _PREAMBLE + _TRANSITIONS

BEGIN = _HEAD + "return begin_(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
RENEW = _HEAD + "return renew_(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"
COMPLETE = _HEAD + "return complete_(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])"
RELEASE = _HEAD + "return release_(KEYS[1], ARGV[1])"

# Any number of transitions in one call, one per key of KEYS, in order. ARGV holds, per
# key, an op code and that transition's arguments: 'b' and 4 (begin), 'n' and 3 (renew), 'c'
# and 4 (complete), 'x' and 1 (release). Reply: one reply per key, as the transition's own
# script gives it, or {-1, message} where that transition failed (e.g. WRONGTYPE on a key
# something else wrote): the others still ran, so one bad key costs only its own call.
BATCH = (
    _HEAD
    + """
local out = {}
local a = 1
for i = 1, #KEYS do
    local op, ok, reply = ARGV[a], nil, nil
    if op == 'b' then
        ok, reply = pcall(begin_, KEYS[i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
        a = a + 5
    elseif op == 'c' then
        ok, reply = pcall(complete_, KEYS[i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4])
        a = a + 5
    elseif op == 'n' then
        ok, reply = pcall(renew_, KEYS[i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
        a = a + 4
    elseif op == 'x' then
        ok, reply = pcall(release_, KEYS[i], ARGV[a + 1])
        a = a + 2
    else
        return redis.error_reply('oncely batch: unknown op ' .. tostring(op))
    end
    if not ok then
        if type(reply) == 'table' then reply = reply.err end
        reply = {-1, tostring(reply)}
    end
    out[i] = reply
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Script:
    """A script's source and the SHA1 that ``EVALSHA`` names it by."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


SCRIPTS = {
    name: Script(name, source)
    for name, source in (
        ("begin", BEGIN),
        ("renew", RENEW),
        ("complete", COMPLETE),
        ("release", RELEASE),
        ("batch", BATCH),
    )
}
