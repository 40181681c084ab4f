"""The standalone Redis server's batch connection (``oncely.stores.redis``).

One connection of the client's own kind (its pool's options: address, TLS, credentials,
database, timeouts, retries), kept out of the pool for the batches alone. Under load a batch
goes out every round trip, and what redis-py wraps around one command cost more client CPU
than the batch's own I/O: a pool checkout (a condition, a readiness probe, metrics hooks), a
send in a task of its own under ``wait_for``, a reply read through four coroutine layers, an
``asyncio.timeout`` per exchange. So an exchange here is a write, and the reply read by the
parser's ``hiredis.Reader`` fed straight from the connection's own protocol (``_redis_link``),
under a deadline kept by one timer per connection (``_Watch``) rather than one per exchange.

Two ways in: ``start`` sends a batch from a loop callback and answers it from the protocol's,
with no task (nearly every batch); ``send`` is the coroutine that reconnects, retries as the
client's ``Retry`` does, and takes over a ``start`` that failed as its first attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import exceptions as rx
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser

from oncely.stores._redis_link import Link, take_over

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
        self._link: Link | None = None
        self._failed: BaseException | None = None  # a start's failure, for send to retry

    def start(self, packed: bytes, answer: Callable[[Any], None]) -> bool:
        """Send one packed command without a task, if the connection is open, taken over and
        idle; ``answer`` then gets, from a loop callback, the reply, or its error: an error
        reply (``ResponseError``: the connection is in step), or a connection error or
        timeout (the connection is closed, and the next ``send`` retries it as the
        ``Retry``'s first attempt). Returns whether it sent (if not, use ``send``)."""
        link = self._link
        conn = self._conn
        if link is None or link.lost or not link.idle or self._turn.locked():
            return False
        writer = conn._writer
        if writer is None or self._failed is not None:
            return False
        watch = self._watch
        watch.start(writer, conn.socket_timeout)

        def replied(reply: Any, failed: bool) -> None:
            expired = watch.stop()
            if failed:
                exc = self._lost(reply, expired)
                if isinstance(exc, rx.ConnectionError | rx.TimeoutError):
                    self._failed = exc
                answer(exc)
                return
            answer(reply)

        self._put(link, packed, replied)
        return True

    def _put(self, link: Link, packed: bytes, waiter: Callable[[Any, bool], None]) -> None:
        link.send(packed, waiter)

    @staticmethod
    def _lost(exc: BaseException, expired: bool) -> BaseException:
        """redis-py's error for an exchange the connection's end or the deadline cut off."""
        if expired:
            return rx.TimeoutError("Timeout exchanging a batch with redis")
        if isinstance(exc, OSError):
            return rx.ConnectionError(f"Error exchanging a batch with redis: {exc}")
        return exc

    async def send(self, packed: bytes) -> Any:
        """Send one packed command and read its reply, retried as the client's own commands
        are (the connection's ``Retry``: a connection the server closed while idle is opened
        again). Raises redis-py's errors (NOSCRIPT, connection, timeout); a failed or
        cancelled exchange leaves the connection closed, to be opened by the next one."""
        conn = self._conn
        async with self._turn:
            first: BaseException | None
            first, self._failed = self._failed, None
            if first is not None:
                # A start that failed: it was the Retry's first attempt, as below.
                if conn.is_connected:
                    await conn.disconnect(nowait=True)
                return await self._retry(packed, first)
            # A connection the server closed while idle (an idle timeout, a proxy) is opened
            # again before the batch goes out, rather than fail the batch where the client's
            # ``Retry`` retries nothing, or back off first. (redis-py's pool looks for it on
            # checkout where maintenance notifications are off; a pooled batch was no safer.)
            reader = getattr(conn, "_reader", None)
            link = self._link
            if (reader is not None and reader.at_eof()) or (link is not None and link.lost):
                await conn.disconnect()
            if conn.is_connected:
                try:
                    return await self._exchange(packed)  # nearly always: one try
                except (rx.ConnectionError, rx.TimeoutError) as exc:
                    first = exc
            return await self._retry(packed, first)

    async def _retry(self, packed: bytes, first: BaseException | None) -> Any:
        conn = self._conn

        async def once() -> Any:
            nonlocal first
            if first is not None:
                # The try that failed, as the Retry's first attempt: it counts, and backs off.
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
            link = self._link
            if link is not None and not link.lost:
                reply = await self._request(link, packed)
            else:
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

    async def _request(self, link: Link, packed: bytes) -> Any:
        """One exchange through the link, awaited (the ``Retry`` path)."""
        fut: asyncio.Future[tuple[Any, bool]] = asyncio.get_running_loop().create_future()

        def replied(reply: Any, failed: bool) -> None:
            if not fut.done():  # cancelled: the connection is closed after it
                fut.set_result((reply, failed))

        self._put(link, packed, replied)
        reply, failed = await fut
        if failed or isinstance(reply, rx.RedisError):
            raise reply  # the connection's end (the except clause of _exchange), or an error reply
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
        self._take_over()

    def _take_over(self) -> None:
        """The connection is open (redis-py's handshake done): its replies come to a
        ``Link`` where the parser is hiredis; otherwise through ``read_response``."""
        conn: Any = self._conn
        parser = conn._parser
        writer = conn._writer
        self._link = None
        if type(parser) is _AsyncHiredisParser and writer is not None:
            self._link = take_over(writer, parser._reader)

    async def connect(self) -> None:
        await self._conn.connect()
        self._take_over()

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
