"""The batch connection's own protocol (``oncely.stores._redis_dedicated``).

redis-py opens the connection (TLS, AUTH, SELECT, its handshake) with asyncio streams; after
that the connection's transport is handed to a ``Link``, which feeds the bytes the server sends
straight to the parser's ``hiredis.Reader`` in ``data_received`` and answers whoever waits for
the reply there. A batch then costs a write and a callback: no task, no ``StreamReader.read``
and its waiter future, no coroutine layers between the socket and the batch's callers.

redis-py's stream protocol stays behind it for what is not a reply: the end of the connection
(so ``StreamWriter.wait_closed``, which ``Connection.disconnect`` awaits, returns, and the
stream reads as at its end) and the flow control of its writer.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from redis._parsers.hiredis import NOT_ENOUGH_DATA

__all__ = ["Link", "Waiter"]

Waiter = Callable[[Any, bool], None]
"""Gets a reply (an error reply as its exception, as hiredis makes it) and ``False``, or the
error that ended the connection and ``True``; called from a loop callback."""


class Link(asyncio.Protocol):
    """Replies are answered in the order the commands went out, one waiter per command."""

    __slots__ = ("_inner", "_reader", "_waiters", "_write", "lost", "transport")

    def __init__(self, writer: asyncio.StreamWriter, inner: Any, reader: Any) -> None:
        self.transport: Any = writer.transport
        self._write = writer.write  # the stream's own: what writes to the connection stays one
        self._inner = inner
        self._reader = reader
        self._waiters: collections.deque[Waiter] = collections.deque()
        self.lost = False

    def send(self, packed: bytes, waiter: Waiter) -> None:
        """Write one command; ``waiter`` gets its reply. (The transport buffers what the
        socket does not take at once; the exchange's deadline covers a write that never
        drains.)"""
        self._waiters.append(waiter)
        self._write(packed)

    def send_many(self, packed: list[bytes], waiters: list[Waiter]) -> None:
        """Write several commands in one buffer; ``waiters[i]`` gets the ``i``-th reply."""
        self._waiters.extend(waiters)
        self._write(b"".join(packed))

    @property
    def idle(self) -> bool:
        return not self._waiters

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # not RESP (hiredis' protocol error): out of step
                self._abort(exc)
                return
            if reply is NOT_ENOUGH_DATA:
                return
            if not waiters:
                # A reply nobody asked for: the connection is out of step with its commands.
                self._abort(ConnectionResetError("redis sent a reply nobody waited for"))
                return
            waiters.popleft()(reply, False)

    def eof_received(self) -> bool | None:
        self._inner.eof_received()  # the stream reads as at its end
        # The server is done: the transport closes (connection_lost), where the stream's
        # protocol kept it half open and stopped reading, so a batch written then would
        # have waited for its deadline.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._inner.connection_lost(exc)
        self._fail(exc or ConnectionResetError("redis closed the connection"))

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _abort(self, exc: Exception) -> None:
        self._fail(exc)
        self.transport.abort()

    def _fail(self, exc: Exception) -> None:
        waiters = self._waiters
        while waiters:
            waiters.popleft()(exc, True)


def take_over(writer: asyncio.StreamWriter, reader: Any) -> Link | None:
    """Hand the transport behind ``writer`` to a new ``Link`` reading with ``reader`` (the
    parser's ``hiredis.Reader``); ``None`` where the stream holds bytes already read, which
    the link would never see."""
    transport: Any = writer.transport
    inner = transport.get_protocol()
    stream = getattr(inner, "_stream_reader", None)
    if transport.is_closing() or stream is None or stream._buffer or stream.at_eof():
        return None
    link = Link(writer, inner, reader)
    transport.set_protocol(link)
    return link
