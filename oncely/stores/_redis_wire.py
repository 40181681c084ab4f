"""How the Redis store puts a batch of transitions on the wire (``oncely.stores.redis``).

A batch of calls becomes ``EVALSHA`` of the batch script (``_redis_scripts.BATCH``), which runs
every transition of one slot in one call and answers them all in one reply. On a standalone
server that is the whole batch: one command, one reply, one connection checkout, instead of
a pipeline of one command per call, whose per-command bookkeeping in redis-py cost more
client CPU than the transitions themselves.

On a Redis Cluster a script may only touch keys of one slot, so a batch becomes one command
per slot (per key, mostly: every key is its own hash tag), grouped by the node that serves
the slot and written to it in one buffer on one of its pooled connections, all nodes at once
(``send_by_node``). Whatever that fast path cannot settle itself, it hands to redis-py's
cluster pipeline, which follows ``MOVED``/``ASK``, refreshes the slot map and retries a failed
node as it always did: commands a node redirected or refused (``TRYAGAIN``, ``CLUSTERDOWN``),
and every unanswered command of a node whose connection failed. Re-sending is safe: every
transition is idempotent for its token (see ``_redis_scripts``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from redis import exceptions as rx
from redis.crc import key_slot

from oncely.errors import ConfigError, LeaseLost, StoreError, StoreUnavailable
from oncely.stores._redis_errors import translate
from oncely.stores._redis_scripts import SCRIPTS, Script

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster

BATCH_SCRIPT = SCRIPTS["batch"]
_COMPLETE = SCRIPTS["complete"]

_CODES = {"begin": "b", "renew": "n", "complete": "c", "release": "x"}

# First words of a server error that mean "cannot serve now" rather than "bad data".
_UNAVAILABLE_WORDS = frozenset(
    {"READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS"}
)

# Per-command replies of the fast cluster path that the cluster pipeline must redo: nothing
# ran, and the pipeline knows what to do (NOSCRIPT is the store's own to handle).
_REDO = (rx.MovedError, rx.AskError, rx.TryAgainError, rx.ClusterDownError)


class Call(NamedTuple):
    """One transition: its single-key script, the Redis key, the script's arguments."""

    script: Script
    key: str
    args: tuple[str | int | bytes, ...]
    argv: bytes | None = None
    """The op code and ``args`` in RESP, when the caller packed them already (``pack_ints``
    and ASCII text, which every ASCII-compatible encoding writes alike)."""


Command = tuple[Any, ...]

_EVALSHA = b"$7\r\nEVALSHA\r\n$40\r\n" + BATCH_SCRIPT.sha.encode() + b"\r\n"
_PACKED_CODES = {name: b"$1\r\n" + code.encode() + b"\r\n" for name, code in _CODES.items()}


def encoding_of(client: Redis | RedisCluster) -> tuple[str, str]:
    """The client's text encoding and error handler: keys and arguments are encoded the way
    the client itself would, so a key names the same Redis key whichever path sends it."""
    encoder = client.get_encoder()
    return encoder.encoding, encoder.encoding_errors


def ascii_compatible(encoding: tuple[str, str]) -> bool:
    """Whether ``encoding`` writes ASCII text as ASCII bytes (so ``Call.argv`` may be packed
    without it)."""
    text = bytes(range(128))
    try:
        return text.decode("ascii").encode(*encoding) == text
    except (UnicodeError, LookupError):
        return False


def check_encoding(client: Redis | RedisCluster) -> None:
    """Raise ``ConfigError`` unless the client's encoding is ASCII-compatible: the scripts'
    source goes out in it too, and SCRIPT LOAD would fail on a Lua syntax error."""
    encoding = encoding_of(client)
    if not ascii_compatible(encoding):
        raise ConfigError(
            f"redis client encoding {encoding[0]!r} does not write ASCII as ASCII; "
            "the store needs an ASCII-compatible one (utf-8, the default)"
        )


def pack_ints(*values: int) -> bytes:
    """``values`` as RESP bulk strings."""
    return b"".join(b"$%d\r\n%b\r\n" % (len(b"%d" % v), b"%d" % v) for v in values)


def pack_batch(calls: Sequence[Call], encoding: tuple[str, str]) -> bytes:
    """The RESP bytes of ``batch_command(calls)``, built in one pass: redis-py's general
    packer costs several times more per argument, and a batch is mostly arguments."""
    keys: list[bytes] = []
    argv: list[bytes] = []
    count = 3 + len(calls)
    for call in calls:
        key = call.key.encode(*encoding)
        keys.append(b"$%d\r\n%b\r\n" % (len(key), key))
        count += 1 + len(call.args)
        if call.argv is not None:
            argv.append(call.argv)
            continue
        argv.append(_PACKED_CODES[call.script.name])
        for arg in call.args:
            if isinstance(arg, str):
                arg = arg.encode(*encoding)
            elif isinstance(arg, int):
                arg = b"%d" % arg
            argv.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    n = b"%d" % len(calls)
    head = b"*%d\r\n%b$%d\r\n%b\r\n" % (count, _EVALSHA, len(n), n)
    return b"".join((head, *keys, *argv))


def batch_command(calls: Sequence[Call]) -> Command:
    """``EVALSHA`` of the batch script for ``calls``, in order, as redis-py's arguments."""
    argv: list[Any] = []
    for call in calls:
        argv.append(_CODES[call.script.name])
        argv.extend(call.args)
    return ("EVALSHA", BATCH_SCRIPT.sha, len(calls), *(c.key for c in calls), *argv)


def fill_group(results: list[Any], calls: Sequence[Call], group: Sequence[int], reply: Any) -> None:
    """Put one slot's reply into ``results`` at ``group``'s places (``calls[i]`` for ``i`` in
    ``group``): an error reply fails each of its calls, translated; a reply that does not
    parse fails them all."""
    if isinstance(reply, BaseException):
        for i in group:
            results[i] = translate(reply, calls[i].script.name)
        return
    try:
        got = outcomes([calls[i] for i in group], reply)
    except StoreError as exc:
        got = [exc] * len(group)
    for i, outcome in zip(group, got, strict=True):
        results[i] = outcome


def outcomes(calls: Sequence[Call], reply: Any) -> list[Any]:
    """The batch script's reply, one outcome per call: the transition's own reply, or the
    ``StoreError`` of that call alone (its {-1, message})."""
    if not isinstance(reply, list) or len(reply) != len(calls):
        raise StoreError(f"redis batch: unexpected reply {reply!r:.200}")
    result: list[Any] = []
    for call, one in zip(calls, reply, strict=True):
        if one[0] == -1:
            message = one[1].decode(errors="replace") if isinstance(one[1], bytes) else one[1]
            busy = message.split(" ", 1)[0] in _UNAVAILABLE_WORDS
            kind = StoreUnavailable if busy else StoreError
            result.append(kind(f"redis {call.script.name} failed: {message}"))
        elif call.script is _COMPLETE:
            # Its whole outcome here, so a caller that does not await it (complete_soon: the
            # broker's ack waits for it) needs no second future to read the reply.
            if one[0] == 1:
                result.append(None)
            else:
                lost = f"lease on key {call.key!r} is no longer held by this token"
                result.append(LeaseLost(lost))
        else:
            result.append(one)
    return result


def by_slot(calls: Sequence[Call], encoding: tuple[str, str]) -> dict[int, list[int]]:
    """``{slot: indexes of its calls}``, order kept within a slot."""
    groups: dict[int, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(key_slot(call.key.encode(*encoding)), []).append(i)
    return groups


async def send_by_node(
    client: RedisCluster,
    slots: list[int],
    packed: list[bytes],
    command: Callable[[int], Command],
) -> list[Any]:
    """Run the packed commands (the ``i``-th on ``slots[i]``; ``command(i)`` gives it as
    redis-py's arguments) on their nodes; one reply per command, or its error. What the
    cluster pipeline raises is the error of the commands handed to it alone: the others'
    replies are committed (a ``begin`` there took its key), so their callers must get them."""
    replies: list[Any] = [None] * len(packed)
    redo: list[int] = []
    nodes: dict[str, tuple[ClusterNode, list[int]]] = {}
    try:
        for i, slot in enumerate(slots):
            node = client.nodes_manager.get_node_from_slot(slot)
            nodes.setdefault(node.name, (node, []))[1].append(i)
    except (rx.RedisError, rx.RedisClusterException):
        # No map of the slots (yet, or any more): the pipeline initialises it.
        nodes, redo = {}, list(range(len(packed)))
    if nodes:
        sent = await asyncio.gather(
            *(_send_to_node(node, [packed[i] for i in todo]) for node, todo in nodes.values())
        )
        for (_, todo), got in zip(nodes.values(), sent, strict=True):
            for i, reply in zip(todo, got, strict=True):
                if reply is _UNANSWERED or isinstance(reply, _REDO):
                    redo.append(i)
                else:
                    replies[i] = reply
    if redo:
        redo.sort()
        try:
            again = await _pipeline(client, [command(i) for i in redo])
        except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
            again = [exc] * len(redo)
        for i, reply in zip(redo, again, strict=True):
            replies[i] = reply
    return replies


async def _pipeline(client: RedisCluster, commands: list[Command]) -> list[Any]:
    """redis-py's cluster pipeline: redirects, slot map refreshes and node retries."""
    pipe = client.pipeline(transaction=False)
    for command in commands:
        # Not pipe.evalsha(): redis-py's cluster pipeline refuses it, since a script may
        # touch keys of several slots. Ours touch one, by which the pipeline routes.
        pipe.execute_command(*command)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


_UNANSWERED = object()


async def _send_to_node(node: ClusterNode, packed: list[bytes]) -> list[Any]:
    """Write ``packed`` to ``node`` in one buffer and read the replies. A connection that
    fails leaves the commands it did not answer ``_UNANSWERED``."""
    replies: list[Any] = [_UNANSWERED] * len(packed)
    try:
        conn = node.acquire_connection()
    except (rx.RedisError, rx.RedisClusterException):
        return replies
    try:
        await conn.send_packed_command(packed)
        # One deadline for all the replies, not a timer per reply (math.inf: none of its own).
        async with asyncio.timeout(conn.socket_timeout):
            for i in range(len(packed)):
                try:
                    replies[i] = await conn.read_response(timeout=math.inf)
                except rx.ResponseError as exc:
                    replies[i] = exc
    except (rx.RedisError, OSError):
        # OSError includes the deadline's TimeoutError.
        # read_response/send_packed_command disconnected it; the pipeline takes over.
        pass
    except BaseException:
        # Cancelled mid-read: replies still due would be read as the next user's.
        await conn.disconnect(nowait=True)
        raise
    finally:
        release = getattr(node, "release", None)
        if release is None:
            # redis-py 5.3 (the extra allows it) has no ClusterNode.release: its own commands
            # put the connection back on the free queue themselves.
            node._free.append(conn)
        else:
            release(conn)
    return replies
