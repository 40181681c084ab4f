"""The Lua scripts of the Redis idempotency store (``oncely.stores.redis``), one per transition.

A key's state is one hash, ``KEYS[1]``, with the fields

- ``s``: ``r`` while a lease runs, ``c`` once completed;
- ``t``: the lease token (kept after completion, so a retried ``complete`` is recognised);
- ``u``: the lease's end, in milliseconds of the server clock (``r`` only);
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

# ARGV: fingerprint, token, lease ms, key ttl ms (lease + grace).
# Reply: {0} NEW, {1, ms left} IN_PROGRESS, {2, result or nil} COMPLETED, {3} MISMATCH.
BEGIN = (
    _PREAMBLE
    + """
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'u', 'r', 't')
if h[1] == 'c' then
    if h[2] ~= ARGV[1] then return {3} end
    return {2, h[4]}
end
if h[1] == 'r' then
    if h[5] == ARGV[2] then return {0} end
    local left = tonumber(h[3]) - now
    if left > 0 then
        if h[2] ~= ARGV[1] then return {3} end
        return {1, left}
    end
    redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 's', 'r', 't', ARGV[2], 'f', ARGV[1],
    'u', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {0}
"""
)

# ARGV: token, lease ms, key ttl ms. Reply: {1} renewed, {0} lease lost.
RENEW = (
    _PREAMBLE
    + """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'r' or h[2] ~= ARGV[1] then return {0} end
redis.call('HSET', KEYS[1], 'u', string.format('%.0f', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1}
"""
)

# ARGV: token, result ttl ms, '1' if a result follows else '0', result.
# Reply: {1} completed (now or by this token before), {0} lease lost.
COMPLETE = """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[2] ~= ARGV[1] then return {0} end
if h[1] == 'c' then return {1} end
redis.call('HDEL', KEYS[1], 'u', 'r')
redis.call('HSET', KEYS[1], 's', 'c')
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'r', ARGV[4]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1}
"""

# ARGV: token. Reply: {1} released, {0} not held by this token (ignored).
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'r' or h[2] ~= ARGV[1] then return {0} end
redis.call('DEL', KEYS[1])
return {1}
"""


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
    )
}
