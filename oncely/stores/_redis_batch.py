"""Pipelining for the Redis and PostgreSQL stores: calls issued in the same event-loop tick
share one batch (one script call or one statement).

Unlike SQLite's group commit (``oncely._sqlite.GroupCommit``), which must write one batch at a
time because the file has one writer, Redis serves several connections at once. So a batch
goes out at the end of the tick in which its first call arrived, without waiting for the batch
before it, up to ``in_flight`` pipelines at a time; calls that arrive while that many are out
wait for the next. A lone call costs one round trip, and many concurrent ones share it.

Calls on one key are never reordered against what their callers can observe: a caller issues
its next call only after the previous one answered, and calls that are concurrent had no order
to keep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from oncely._batch import answer, fail_all

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("oncely.stores.redis")


class Pipeliner(Generic[T, R]):
    """Coalesces concurrent calls into batches written by ``write``.

    Args:
        write: writes one batch, returning one outcome per item in order: a value, or an
            exception that fails that item alone. An exception it raises fails the whole batch
            (each caller gets a copy), so it must not raise once part of the batch committed.
        limit: the most items in one batch.
        in_flight: the most batches written at once.
        abandoned: awaited with an item and its value when its caller was cancelled before it
            got the value (to give back a lease nobody will use). It must not raise.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        limit: int,
        in_flight: int,
        abandoned: Callable[[T, R], Awaitable[None]] | None = None,
    ) -> None:
        self._write = write
        self._limit = limit
        self._in_flight = in_flight
        self._abandoned = abandoned
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._giving: set[asyncio.Task[None]] = set()  # batches answered, giving back
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and return its outcome; raises its error."""
        fut = self.put(item)
        try:
            return await fut
        except asyncio.CancelledError:
            await self.abandon(item, fut)
            raise

    def put(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` for the next batch; the future gets its outcome. For a caller on
        the hot path that awaits the future itself (a coroutine layer less per call than
        ``submit``), and calls ``abandon`` if it is cancelled meanwhile, as ``submit`` does."""
        loop = self._loop
        if loop is None or not (self._scheduled or self._tasks) or loop.is_closed():
            # Looked up only while nothing is under way: on Python 3.11 get_running_loop()
            # costs a getpid system call, which every begin and complete paid. While a batch
            # is scheduled or out, its loop is the one its callers run on, unless it closed.
            self._drop_closed()
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if not self._scheduled and len(self._tasks) < self._in_flight:
            # At the end of this tick: every call issued in it joins the batch. (With every
            # slot taken, the batch that frees one kicks: a kick per tick meanwhile found no
            # slot, and cost a callback per message under load.)
            self._scheduled = True
            loop.call_soon(self._kick)
        return fut

    async def abandon(self, item: T, fut: asyncio.Future[R]) -> None:
        """The caller of ``put`` was cancelled while it awaited ``fut``. Cancelled after the
        outcome arrived but before it resumed, the value is lost to it, so it counts as
        abandoned (earlier, ``_run`` sees to it)."""
        abandoned = self._abandoned
        if abandoned is not None and fut.done() and not fut.cancelled():
            if fut.exception() is None:
                await asyncio.shield(abandoned(item, fut.result()))

    async def drain(self) -> None:
        """Wait until every queued item has been written (or failed)."""
        self._drop_closed()
        while self._queue or self._tasks or self._giving:
            if self._tasks or self._giving:
                await asyncio.gather(*self._tasks, *self._giving, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    def _drop_closed(self) -> None:
        """Forget what a loop that has closed left under way. A loop can close with a batch
        scheduled or out (a store call from a task cancelled at the loop's shutdown, an
        embedded worker's loop torn down): that batch never runs or answers, and its callers
        are gone with the loop. Kept, it held the only slot for good, and every call on the
        next loop failed (its futures on the closed loop) or, before, waited for ever."""
        loop = self._loop
        if loop is None or not loop.is_closed():
            return
        if self._queue or self._tasks or self._giving:
            log.warning(
                "store batcher: its event loop closed with %d call(s) queued and %d batch(es) "
                "under way; dropped (their callers are gone with it)",
                len(self._queue),
                len(self._tasks) + len(self._giving),
            )
        self._queue.clear()
        self._tasks.clear()
        self._giving.clear()
        self._scheduled = False
        self._loop = None

    def _kick(self) -> None:
        self._scheduled = False
        while self._queue and len(self._tasks) < self._in_flight:
            batch = self._queue[: self._limit]
            del self._queue[: self._limit]
            task = (self._loop or asyncio.get_running_loop()).create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._giving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _run catches what write raises; anything else is a bug worth a traceback.
            log.error("redis store batch failed", exc_info=task.exception())
        self._free(task)

    def _free(self, task: asyncio.Task[None]) -> None:
        """``task`` no longer holds a slot: the next batch may go."""
        self._tasks.discard(task)
        if self._queue and not self._scheduled:
            self._scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._kick)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            try:
                outcomes = await self._write([item for item, _ in batch])
            except Exception as exc:
                fail_all(batch, exc)
                return
            answered = answer(batch, outcomes)
            # Only after every waiter has its answer: a give-back is a round trip of its own.
            # Out of the batch's slot, too: with one batch in flight, the calls of every other
            # run (completes, renewals) would wait behind each give-back. drain() still
            # waits for them.
            give_back = self._abandoned
            if give_back is not None and answered:
                task = asyncio.current_task()
                assert task is not None
                self._giving.add(task)
                self._free(task)
                for item, value in answered:
                    await give_back(item, value)
        except BaseException:
            # Cancelled (the loop is shutting down): nobody writes these now.
            for _, fut in batch:
                fut.cancel()
            raise
