"""The consuming side of the SQLite broker (``oncely.brokers.sqlite``): a subscription that
claims rows into a buffer, and the delivery of one claimed row, whose settles only touch the row
while it still carries its claim token."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from oncely.brokers._local import LocalDelivery, LocalSubscription, check_delay
from oncely.brokers._sqlite_queue import (
    EXTEND,
    NACK,
    NACK_DEFER,
    NACK_ERROR,
    NACK_ERROR_DEFER,
    decode_headers,
    to_json,
)
from oncely.brokers.base import Delivery, error_headers
from oncely.errors import ConnectionLost

if TYPE_CHECKING:
    import aiosqlite

    from oncely.brokers._sqlite_queue import AckBatcher

__all__ = ["QueueFile", "SqliteDelivery", "SqliteSubscription"]


class QueueFile(Protocol):
    """What a subscription and its deliveries use of their ``SqliteBroker`` (which imports
    this module, so it is not named here)."""

    poll_interval: float
    max_poll_interval: float
    _acks: AckBatcher
    _subs: set[SqliteSubscription]
    _waiters: dict[str, set[asyncio.Future[bool]]]

    def _require(self) -> aiosqlite.Connection: ...
    def _wake(self, topic: str) -> None: ...
    async def _exec(self, sql: str, params: tuple[Any, ...]) -> int: ...
    async def _claim(self, topic: str, n: int, visibility: float) -> list[Any]: ...
    async def _next_visible(self, topic: str) -> float | None: ...
    async def _release(self, deliveries: list[SqliteDelivery]) -> None: ...
    async def _reject(self, d: SqliteDelivery, reason: str) -> bool: ...


class SqliteSubscription(LocalSubscription):
    def __init__(self, broker: QueueFile, topic: str, prefetch: int, visibility: float) -> None:
        super().__init__(topic, prefetch, visibility)
        self._broker = broker
        self._buffer: deque[SqliteDelivery] = deque()
        self._ready = True  # try a claim before looking at MIN(visible_at)
        self._idle = broker.poll_interval
        self._fill: asyncio.Task[bool] | None = None

    async def __anext__(self) -> Delivery:
        try:
            return await self._next()
        except ConnectionLost:
            if self.closed:  # the broker closed the file under a pending look; not an error
                raise StopAsyncIteration from None
            raise

    async def _next(self) -> Delivery:
        broker = self._broker
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._buffer:
                self.unsettled += 1
                return self._buffer.popleft()
            room = self.prefetch - self.unsettled
            if room <= 0:
                await self.park(None, None)
                continue
            if self._ready:
                if self._fill is None:
                    self._fill = asyncio.create_task(self._claim_into_buffer(room))
                # Shielded: if this __anext__ is cancelled mid-claim, the claimed rows still
                # reach the buffer, and aclose() gives them back instead of leaving them
                # invisible until their visibility runs out.
                if await asyncio.shield(self._fill):
                    self._idle = broker.poll_interval
                    continue
            # Look before claiming again: a read takes no write lock, so idle consumers in
            # other processes do not contend with the ones doing work.
            nxt = await broker._next_visible(self.topic)
            now = time.time()
            if nxt is not None and nxt <= now:
                self._ready = True
                continue
            wait = self._idle if nxt is None else min(self._idle, nxt - now)
            woken = await self.park(broker._waiters.setdefault(self.topic, set()), wait)
            # A local publish is worth a claim at once; a timeout only a look (it may have
            # been a time-based wake-up with nothing due in the end).
            self._ready = woken
            if woken:
                self._idle = broker.poll_interval
            else:
                self._idle = min(self._idle * 2, broker.max_poll_interval)

    async def _claim_into_buffer(self, n: int) -> bool:
        try:
            rows = await self._broker._claim(self.topic, n, self.visibility)
            self._buffer.extend(SqliteDelivery(self, row) for row in rows)
            return bool(rows)
        finally:
            self._fill = None

    async def aclose(self) -> None:
        """Stop fetching and give buffered messages back at once. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._broker._subs.discard(self)
        self.interrupt()
        if self._fill is not None:
            await asyncio.gather(self._fill, return_exceptions=True)
        if self._buffer:
            buffered = list(self._buffer)
            self._buffer.clear()
            await self._broker._release(buffered)


class SqliteDelivery(LocalDelivery):
    __slots__ = ("_broker", "_rowid", "_token")

    def __init__(self, sub: SqliteSubscription, row: tuple[Any, ...]) -> None:
        rowid, mid, body, headers, enqueued_at, attempts, token = row
        super().__init__(
            sub,
            id=mid,
            body=body,
            headers=decode_headers(headers),
            attempt=attempts,
            enqueued_at=enqueued_at,
        )
        self._broker = sub._broker
        self._rowid: int = rowid
        self._token: str = token

    async def ack(self) -> None:
        await self._settle(self._ack)

    async def _ack(self) -> bool:
        self._broker._require()
        return await self._broker._acks.ack(self._rowid, self._token)

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> None:
        async def attempt() -> bool:
            check_delay(delay)
            params: tuple[Any, ...] = (time.time() + delay, self._rowid, self._token)
            if error is not None:
                # The row's headers, as delivered, plus the error: the same UPDATE, so a nack
                # that lost its claim changes nothing.
                headers = to_json(error_headers(self.headers, error))
                sql = NACK_ERROR_DEFER if defer else NACK_ERROR
                return bool(await self._broker._exec(sql, (headers, *params)))
            return bool(await self._broker._exec(NACK_DEFER if defer else NACK, params))

        await self._settle(attempt)
        self._broker._wake(self.topic)

    async def reject(self, reason: str) -> None:
        await self._settle(lambda: self._broker._reject(self, reason))

    async def extend(self, seconds: float) -> bool:
        check_delay(seconds, "seconds")
        if self._settled:
            return False
        params = (time.time() + seconds, self._rowid, self._token)
        if not await self._broker._exec(EXTEND, params):
            self._expired()
        return True
