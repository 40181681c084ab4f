"""An idempotency store in Redis or Redis Cluster, shared by every worker that can reach it.

``redis://host:6379/0``, ``rediss://`` for TLS, ``redis://h1:7000,h2:7001/?cluster=1`` for
Redis Cluster (the options are in ``oncely.stores._redis_url``). Needs ``pip install
'oncely[redis]'`` (redis-py's asyncio client) and Redis ≥ 5 (developed against 7).

Each key's state is one hash, ``<prefix>{<key>}``; the braces are a Cluster hash tag, so a key
lives in one slot and every transition on it is one script on one node. Each transition
(``begin``, ``renew``, ``complete``, ``release``) is one Lua script, run with ``EVALSHA``, so it
is atomic among all clients of that server. Leases and result ttls use the server's clock
(``TIME`` inside the script), so the workers' clocks do not matter. The key's own TTL makes
Redis forget it: a result after ``result_ttl``, a running key an hour after its lease ended
(``STALE_LEASE_GRACE_MS``: a crashed worker's lease still ends on time, since ``begin`` checks
the lease's end itself, but a slow owner nobody took over may still complete its key).

Calls issued together are batched (``oncely.stores._redis_batch``): the calls of one
event-loop tick share one batch, sent at the end of that tick while fewer than ``IN_FLIGHT``
are out, so a lone call is not delayed and many concurrent ones share one round trip. On a
standalone server a batch is one ``EVALSHA`` of a script that runs every transition of the
batch (``oncely.stores._redis_wire``); on a Cluster it is one command per slot, written to
each node in one buffer. Each caller still gets its own outcome, and a transition that fails
(``WRONGTYPE`` on its key) fails only its own call. A batch goes out on the store's own
connection (one per node on a Cluster, ``_redis_dedicated``, ``_redis_nodes``), written from
the batcher's callback and answered from the connection's protocol (``_redis_link``); what
needs more (a reconnect and retry, scripts to load again, a redirect) runs on a task.

Failure: a server that is down, refuses, times out, is loading or failing over raises
``StoreUnavailable``, and the worker fails closed (the message is retried later, the handler
does not run). Other server errors (``WRONGTYPE`` on a key something else wrote, out of memory)
raise ``StoreError``. A restarted server that lost its script cache is handled: scripts are
loaded again and the calls re-sent. A restarted server that lost its *data* (no persistence)
has forgotten every key: a redelivery of a key completed before the restart runs again. Give
Redis persistence (``appendonly yes``) if that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster

from oncely.errors import ConfigError, LeaseLost, StoreError, StoreUnavailable
from oncely.stores._key_batch import new_call, new_token
from oncely.stores._redis_batch import Finish, Pipeliner
from oncely.stores._redis_dedicated import Dedicated
from oncely.stores._redis_errors import close_quietly, map_errors, translate
from oncely.stores._redis_fallbacks import Fallbacks
from oncely.stores._redis_nodes import NodeLinks, start_cluster
from oncely.stores._redis_scripts import SCRIPTS, STALE_LEASE_GRACE_MS
from oncely.stores._redis_url import (
    DEFAULT_PREFIX,
    RedisOptions,
    build_client,
    check_prefix,
    parse_redis_url,
)
from oncely.stores._redis_wire import Call as _Call
from oncely.stores._redis_wire import (
    check_encoding,
    encoding_of,
    outcomes,
    pack_batch,
    pack_ints,
)
from oncely.stores.base import Begin, IdempotencyStore, Outcome

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStore"]

BATCH = 256
"""Most calls one pipeline carries."""

IN_FLIGHT = 1
"""Most pipelines out at once; calls that arrive meanwhile wait for the next, as in SQLite's
group commit. Each pipeline costs the client (and the server: a script call, a write and a
wake-up) far more than each call in it, so fewer, fuller pipelines win: on RabbitMQ with 32
handlers, 1 in flight gave 0.65x of no store where 2 gave 0.57x (one run, three interleaved
rounds each), and 4 or 16 did worse again. A slow reply holds the next batch back (lease
renewals too), but no longer than the socket timeout times the client's tries (a URL client
tries twice); a given client without ``socket_timeout`` sets no bound at all."""

_BEGIN, _RENEW, _COMPLETE, _RELEASE = (
    SCRIPTS[n] for n in ("begin", "renew", "complete", "release")
)


class RedisStore(Fallbacks, IdempotencyStore):
    """Keys, leases and results in Redis hashes, one per key, changed only by Lua scripts.

    Args:
        target: a ``redis://``/``rediss://`` URL, or an existing ``redis.asyncio.Redis`` or
            ``RedisCluster`` client (an application that embeds the worker may already have
            one). A client passed in is used as is and not closed by ``aclose``.
        prefix: prepended to every key (default ``oncely:``); with a URL, give it there
            (``?prefix=``) instead.

    Raises:
        ConfigError: a bad URL, or a prefix given twice or containing a brace.
    """

    complete_on_caller: ClassVar[bool] = True  # batched on its own task

    def __init__(
        self,
        target: str | Redis | RedisCluster = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
    ) -> None:
        self._options: RedisOptions | None = None
        self._given: Redis | RedisCluster | None = None
        if isinstance(target, str):
            self._options = parse_redis_url(target)
            if prefix is not None:
                raise ConfigError(f"{target!r}: give the prefix in the URL (?prefix=...)")
            self.url = target
            self.prefix = self._options.prefix
        else:
            self._given = target
            self.url = ""
            self.prefix = check_prefix(DEFAULT_PREFIX if prefix is None else prefix, "RedisStore")
        self._client: Redis | RedisCluster | None = None
        self._connecting: asyncio.Lock | None = None
        self._encoding: tuple[str, str] | None = None
        self._wire: Dedicated | None = None
        self._nodes: NodeLinks | None = None  # a Cluster's batch links, one per node
        self._ms_memo: dict[tuple[float, int | None], tuple[int, int, bytes]] = {}
        self._reload = False  # a batch met NOSCRIPT: load the scripts before the next
        self._batch: Pipeliner[_Call, Any] = Pipeliner(
            self._write,
            limit=BATCH,
            in_flight=IN_FLIGHT,
            abandoned=self._give_back,
            start=self._start,
        )

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Build a store from ``redis://host:port/db?options`` (see the module docstring).

        Raises:
            ConfigError: the URL is malformed or has an unknown or bad option.
        """
        return cls(url)

    @property
    def cluster(self) -> bool:
        """Whether the store talks to a Redis Cluster."""
        from redis.asyncio.cluster import RedisCluster

        if self._options is not None:
            return self._options.cluster
        return isinstance(self._given, RedisCluster)

    def redis_key(self, key: str) -> str:
        """The Redis key that holds ``key``'s state: the prefix, then the key as hash tag."""
        return f"{self.prefix}{{{key}}}"

    async def connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is not None:
                return
            client = (
                self._given if self._given is not None else build_client(self._require_options())
            )
            check_encoding(client)
            try:
                with map_errors("connect"):
                    await client.ping()
                    await self._load_scripts(client)
                    self._encoding = encoding_of(client)
                    if isinstance(client, RedisCluster):
                        nodes = NodeLinks(client)
                        await nodes.connect()
                        self._nodes = nodes
                    else:
                        wire = Dedicated(client)
                        await wire.connect()
                        self._wire = wire
            except BaseException:
                if self._given is None:
                    await close_quietly(client)
                raise
            self._client = client

    async def aclose(self) -> None:
        # Calls already queued still get their outcomes; the connections go after them.
        await self._batch.drain()
        client, self._client = self._client, None
        wire, self._wire = self._wire, None
        nodes, self._nodes = self._nodes, None
        if nodes is not None:
            await nodes.aclose()
        if wire is not None:
            with contextlib.suppress(rx.RedisError, OSError):
                await wire.aclose()
        if client is not None and self._given is None:
            await close_quietly(client)

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        if self._client is None:  # self._checked() and self._packed_ms() inlined: per message
            self._checked()
        token = new_token()
        lease_ms, key_ttl, tail = self._ms_memo.get((lease, STALE_LEASE_GRACE_MS)) or (
            self._packed_ms(lease, STALE_LEASE_GRACE_MS)
        )
        args = (fingerprint, token, lease_ms, key_ttl)
        argv = None
        # Every message: packed here in one go. (The client's encoding writes ASCII as ASCII:
        # connect checked it.)
        if fingerprint.isascii():
            argv = b"$1\r\nb\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (
                len(fingerprint),
                fingerprint.encode(),
                len(token),
                token.encode(),
                tail,
            )
        call = new_call(_Call, (_BEGIN, self.redis_key(key), args, argv))
        # The batch's future awaited here, not through Pipeliner.submit: a coroutine less.
        fut = self._batch.put(call)
        try:
            reply = await fut
        except asyncio.CancelledError:
            await self._batch.abandon(call, fut)
            raise
        code = int(reply[0])
        if code == 0:
            return Begin(Outcome.NEW, token=token)
        if code == 1:
            return Begin(Outcome.IN_PROGRESS, retry_after=int(reply[1]) / 1000)
        if code == 2:
            result = reply[1] if len(reply) > 1 else None
            return Begin(Outcome.COMPLETED, result=None if result is None else bytes(result))
        return Begin(Outcome.MISMATCH)

    async def renew(self, key: str, token: str, lease: float) -> None:
        self._checked()
        lease_ms = _ms(lease)
        args = (token, lease_ms, lease_ms + STALE_LEASE_GRACE_MS)
        reply = await self._batch.submit(_Call(_RENEW, self.redis_key(key), args))
        if int(reply[0]) != 1:
            raise LeaseLost(f"lease on key {key!r} is no longer held by this token")

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        # Its outcome is None or LeaseLost already (outcomes()); nothing to give back if
        # cancelled (no abandon): a completion someone else may rely on stands.
        await self.complete_soon(key, token, result, ttl)

    completes_soon: ClassVar[bool] = True

    def complete_soon(
        self, key: str, token: str, result: bytes | None, ttl: float
    ) -> asyncio.Future[None]:
        if self._client is None:  # inlined as in begin
            self._checked()
        ttl_ms, _, packed_ttl = self._ms_memo.get((ttl, None)) or self._packed_ms(ttl, None)
        args = (token, ttl_ms, "0", b"") if result is None else (token, ttl_ms, "1", result)
        argv = None
        if token.isascii():  # every message: packed here in one go, as in begin
            head = b"$1\r\nc\r\n$%d\r\n%b\r\n%b" % (len(token), token.encode(), packed_ttl)
            if result is None:
                argv = head + b"$1\r\n0\r\n$0\r\n\r\n"
            else:
                argv = b"%b$1\r\n1\r\n$%d\r\n%b\r\n" % (head, len(result), result)
        future: asyncio.Future[None] = self._batch.put(
            new_call(_Call, (_COMPLETE, self.redis_key(key), args, argv))
        )
        return future

    async def release(self, key: str, token: str) -> None:
        self._checked()
        await self._batch.submit(_Call(_RELEASE, self.redis_key(key), (token,)))

    # -- internals ----------------------------------------------------------------------------

    def _packed_ms(self, seconds: float, grace: int | None) -> tuple[int, int, bytes]:
        """``seconds`` in ms, that plus ``grace`` (or 0), and both (or the first) in RESP:
        the handlers of a worker pass a few lease and ttl values over and over."""
        memo = self._ms_memo
        got = memo.get((seconds, grace))
        if got is None:
            ms = _ms(seconds)
            plus = 0 if grace is None else ms + grace
            got = (ms, plus, pack_ints(ms) if grace is None else pack_ints(ms, plus))
            if len(memo) >= 64:
                memo.clear()
            memo[seconds, grace] = got
        return got

    def _require_options(self) -> RedisOptions:
        assert self._options is not None
        return self._options

    def _checked(self) -> Redis | RedisCluster:
        if self._client is None:
            raise StoreUnavailable("redis store is not connected (call connect() first)")
        return self._client

    def _start(self, calls: list[_Call], finish: Finish[Any]) -> bool:
        """The batch sent from the batcher's callback and answered from the connection's
        (``Dedicated.start``), where nothing needs a coroutine: whatever does (a lost
        connection to reopen and retry, scripts to load again, a key the encoding cannot
        carry) goes back to ``_write`` on a task."""
        wire = self._wire
        encoding = self._encoding
        if wire is None or encoding is None or self._reload:
            if self._nodes is not None and encoding is not None:
                return start_cluster(self._nodes, calls, encoding, finish)
            return False
        try:
            packed = pack_batch(calls, encoding)
        except UnicodeError:
            return False

        def answer(reply: Any) -> None:
            if isinstance(reply, Exception):
                if isinstance(reply, rx.NoScriptError):
                    self._reload = True
                    finish(None)
                elif isinstance(reply, rx.ConnectionError | rx.TimeoutError):
                    finish(None)  # the wire retries it, this try counted
                else:
                    finish(translate(reply, "batch"))
                return
            try:
                got = outcomes(calls, reply)
            except StoreError as exc:
                finish(exc)
                return
            finish(got)

        return wire.start(packed, answer)

    async def _write(self, calls: list[_Call]) -> list[Any]:
        """The batch on the wire (``oncely.stores._redis_wire``); one outcome per call: the
        script's reply, or an error for that call alone. A server that answers NOSCRIPT (it
        restarted and lost its script cache) ran nothing of that command: the scripts are
        loaded again and the command re-sent, once."""
        client = self._checked()
        assert self._encoding is not None  # set by connect, with the client
        try:
            return await self._write_encoded(client, calls, self._encoding)
        except UnicodeError:
            # Raised while packing, before anything was sent: a key or argument the client's
            # encoding cannot carry (a lone surrogate). It fails its own call, not the batch.
            return await self._write_apart(client, calls, self._encoding)

    async def _write_encoded(
        self, client: Redis | RedisCluster, calls: list[_Call], encoding: tuple[str, str]
    ) -> list[Any]:
        wire = self._wire
        # The standalone wire first, and map_errors' work only on an error: per batch, a
        # Protocol isinstance (RedisCluster is one) and a context manager cost ~5 k
        # instructions.
        if wire is None:
            if isinstance(client, RedisCluster):
                return await self._write_cluster(client, calls, encoding)
            raise StoreUnavailable("redis store is not connected (call connect() first)")
        packed = pack_batch(calls, encoding)
        try:
            if self._reload:
                self._reload = False
                await self._load_scripts(client)
            try:
                reply = await wire.send(packed)
            except rx.NoScriptError:
                await self._load_scripts(client)
                reply = await wire.send(packed)
        except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
            raise translate(exc, "batch") from exc  # as map_errors("batch") does
        return outcomes(calls, reply)


def _ms(seconds: float) -> int:
    # PEXPIRE 0 would delete the key at once; a lease or ttl is at least a millisecond.
    return max(1, round(seconds * 1000))
