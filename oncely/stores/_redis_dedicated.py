"""The standalone Redis server's batch connection (``oncely.stores.redis``).

One connection of the client's own kind (its pool's options: address, TLS, credentials,
database, timeouts, retries), kept out of the pool for the batches alone. Under load a batch
goes out every round trip, and what redis-py wraps around one command cost more client CPU
than the batch's own I/O: a pool checkout (a condition, a readiness probe, metrics hooks), a
send in a task of its own under ``wait_for``, a reply read through four coroutine layers, an
``asyncio.timeout`` per exchange. So an exchange here is a write, and a read of the parser's
``hiredis.Reader`` fed straight from the stream, under a deadline kept by one timer per
connection (``_Watch``) rather than one per exchange.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from redis import exceptions as rx
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Dedicated"]


_READ = 65536


class Dedicated:
    """Batches take turns on the connection (``IN_FLIGHT`` is 1); a second one waits for the
    first's reply rather than interleave with it."""

    def __init__(self, client: Redis) -> None:
        self._conn = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._turn = asyncio.Lock()
        self._watch = _Watch()

    async def send(self, packed: bytes) -> Any:
        """Send one packed command and read its reply, retried as the client's own commands
        are (the connection's ``Retry``: a connection the server closed while idle is opened
        again). Raises redis-py's errors (NOSCRIPT, connection, timeout); a failed or
        cancelled exchange leaves the connection closed, to be opened by the next one."""
        conn = self._conn
        async with self._turn:
            # A connection the server closed while idle (an idle timeout, a proxy) is opened
            # again before the batch goes out, rather than fail the batch where the client's
            # ``Retry`` retries nothing, or back off first. (redis-py's pool looks for it on
            # checkout where maintenance notifications are off; a pooled batch was no safer.)
            reader = getattr(conn, "_reader", None)
            if reader is not None and reader.at_eof():
                await conn.disconnect()
            if conn.is_connected:
                try:
                    return await self._exchange(packed)  # nearly always: one try
                except (rx.ConnectionError, rx.TimeoutError) as exc:
                    first: BaseException | None = exc
            else:
                first = None

            async def once() -> Any:
                nonlocal first
                if first is not None:
                    # The try above, as the Retry's first attempt: it counts, and backs off.
                    failed, first = first, None
                    raise failed
                if not conn.is_connected:
                    await self._reconnect()
                return await self._exchange(packed)

            async def failed(_: BaseException) -> None:
                await conn.disconnect()

            return await conn.retry.call_with_retry(once, failed)

    async def _exchange(self, packed: bytes) -> Any:
        conn = self._conn
        writer = conn._writer
        assert writer is not None
        watch = self._watch
        watch.start(writer, conn.socket_timeout)
        try:
            writer.write(packed)
            await writer.drain()  # returns at once unless the socket's buffer is full
            reply = await self._read()
        except rx.ResponseError:
            watch.stop()
            raise  # a reply read whole (NOSCRIPT): the connection is in step
        except BaseException as exc:
            # From the write, the read, or the deadline (which aborts the transport). Or
            # cancelled while the write waited for room or the reply was due: the rest of the
            # command still goes out and is answered, a reply the next batch would read as
            # its own. As redis-py's send_packed_command and read_response do, the connection
            # is closed.
            expired = watch.stop()
            await conn.disconnect(nowait=True)
            if expired:
                raise rx.TimeoutError("Timeout exchanging a batch with redis") from None
            if isinstance(exc, OSError):
                raise rx.ConnectionError(f"Error exchanging a batch with redis: {exc}") from exc
            raise
        watch.stop()
        return reply

    async def _read(self) -> Any:
        """The reply: fed from the stream to the parser's ``hiredis.Reader`` here rather than
        through ``read_response``, whose layers cost more than the read (where the parser is
        not hiredis, through ``read_response``, with no deadline of its own)."""
        conn = self._conn
        parser: Any = conn._parser
        if type(parser) is not _AsyncHiredisParser:
            return await conn.read_response(timeout=float("inf"))
        reader: Any = parser._reader
        stream: Any = parser._stream
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            data = await stream.read(_READ)
            if not data:
                raise ConnectionResetError("redis closed the connection")
            reader.feed(data)
            reply = reader.gets()
        if isinstance(reply, rx.RedisError):
            # An error reply: hiredis makes it the exception to raise.
            raise reply
        return reply

    async def _reconnect(self) -> None:
        conn: Any = self._conn
        check = getattr(conn, "connect_check_health", None)
        if check is None:
            # redis-py 5.3 (the extra allows it) has no connect_check_health; its
            # connect() checks no health either (a PING only with health_check_interval).
            await conn.connect()
        else:
            # No health check: the connection is read to the end of every reply.
            await check(check_health=False)

    async def connect(self) -> None:
        await self._conn.connect()

    async def aclose(self) -> None:
        self._watch.cancel()
        await self._conn.disconnect()


class _Watch:
    """The deadline of the exchange under way, kept by one timer that is re-armed only when it
    fires: exchanges come every round trip and a deadline is seconds, so nearly every one
    starts and stops with two assignments, where ``asyncio.timeout`` made and cancelled a
    timer (and its loop handle) per exchange. Past the deadline it aborts the transport: the
    write or the read under way fails, and ``expired`` tells that from a lost connection."""

    __slots__ = ("_deadline", "_loop", "_timer", "_transport", "expired")

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.WriteTransport | None = None
        self.expired = False

    def start(self, writer: asyncio.StreamWriter, timeout: float | None) -> None:
        self.expired = False
        if timeout is None:
            self._deadline = None
            return
        transport: Any = writer.transport
        loop = self._loop
        if transport is not self._transport or loop is None:
            # A new connection (or the first): its loop, once, not per exchange (on Python
            # 3.11 looking the running loop up is a system call).
            self.cancel()
            self._transport = transport
            loop = self._loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)

    def stop(self) -> bool:
        """The exchange is over; whether its deadline passed (the transport aborted)."""
        self._deadline = None
        return self.expired

    def _fire(self) -> None:
        self._timer = None
        deadline, loop = self._deadline, self._loop
        if deadline is None or loop is None:
            return  # nothing out: the next exchange arms it again
        if loop.time() < deadline:  # a later exchange's deadline
            self._timer = loop.call_at(deadline, self._fire)
            return
        self.expired = True
        self._deadline = None
        transport = self._transport
        if transport is not None:
            transport.abort()

    def cancel(self) -> None:
        """Drop the timer (the connection is closing, or another replaces it)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
