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
from typing import Generic, TypeAlias, TypeVar

from oncely._batch import answer, fail_all

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("oncely.stores.redis")

_PASSES = 8
"""The most loop passes the next batch waits, after one answered from a callback, for calls
that keep coming."""

Finish: TypeAlias = Callable[[list[R | Exception] | Exception | None], None]
"""How a batch started by ``start`` ends: its outcomes, an exception that fails it whole, or
``None`` to send it again on a task through ``write`` (the slow path)."""


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
        start: tries to send a batch without a task (a write, the reply answered from the
            connection's own callback): returns whether it did, and then calls the given
            ``Finish`` once, from a loop callback, never from inside ``start``. A batch it
            does not take, or hands back (``None``), goes through ``write`` on a task.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        limit: int,
        in_flight: int,
        abandoned: Callable[[T, R], Awaitable[None]] | None = None,
        start: Callable[[list[T], Finish[R]], bool] | None = None,
    ) -> None:
        self._write = write
        self._start = start
        self._limit = limit
        self._in_flight = in_flight
        self._abandoned = abandoned
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: set[_Sent[T, R]] = set()  # batches out without a task (``start``)
        self._settled: asyncio.Future[None] | None = None  # drain() waits on ``_out``
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
        if loop is None or not (self._scheduled or self._tasks or self._out) or loop.is_closed():
            # Looked up only while nothing is under way: on Python 3.11 get_running_loop()
            # costs a getpid system call, which every begin and complete paid. While a batch
            # is scheduled or out, its loop is the one its callers run on, unless it closed.
            self._drop_closed()
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if not self._scheduled and len(self._tasks) + len(self._out) < self._in_flight:
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
        while self._queue or self._tasks or self._giving or self._out:
            if self._out:
                settled = self._settled
                if settled is None or settled.done():
                    settled = self._settled = asyncio.get_running_loop().create_future()
                await asyncio.gather(*self._tasks, *self._giving, settled, return_exceptions=True)
            elif self._tasks or self._giving:
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
        if self._queue or self._tasks or self._giving or self._out:
            log.warning(
                "store batcher: its event loop closed with %d call(s) queued and %d batch(es) "
                "under way; dropped (their callers are gone with it)",
                len(self._queue),
                len(self._tasks) + len(self._giving) + len(self._out),
            )
        self._queue.clear()
        self._tasks.clear()
        self._out.clear()
        self._settled = None
        self._giving.clear()
        self._scheduled = False
        self._loop = None

    def _kick(self) -> None:
        self._scheduled = False
        start = self._start
        while self._queue and len(self._tasks) + len(self._out) < self._in_flight:
            batch = self._queue[: self._limit]
            del self._queue[: self._limit]
            if start is not None:
                sent = _Sent(self, batch)
                if start([item for item, _ in batch], sent.finish):
                    self._out.add(sent)
                    continue
            self._spawn(batch)

    def _spawn(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        task = (self._loop or asyncio.get_running_loop()).create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _finished(self, sent: _Sent[T, R], outcome: list[R | Exception] | Exception | None) -> None:
        """A batch ``start`` sent has its outcome (or is handed back, ``None``)."""
        if sent not in self._out:
            return  # its loop closed meanwhile (_drop_closed): its callers are gone
        batch = sent.batch
        self._out.discard(sent)
        if not self._out:
            settled, self._settled = self._settled, None
            if settled is not None and not settled.done():
                settled.set_result(None)  # drain() goes on to the tasks
        if outcome is None:
            self._spawn(batch)  # its slot passes to the task: no other batch goes between
            return
        if isinstance(outcome, Exception):
            fail_all(batch, outcome)
        else:
            try:
                answered = answer(batch, outcome)
            except Exception as exc:  # outcomes that do not match the batch: a bug
                log.error("redis store batch failed", exc_info=exc)
                fail_all(batch, exc)
                answered = []
            give_back = self._abandoned
            if give_back is not None and answered:
                # Only after every waiter has its answer, and out of the batch's slot, as
                # _run does.
                loop = self._loop or asyncio.get_running_loop()
                task = loop.create_task(self._give_back(give_back, answered))
                self._giving.add(task)
                task.add_done_callback(self._done)
        if not self._scheduled:
            # Not at once: the callers woken here make the next calls over the next loop
            # passes, so the next batch waits while they keep coming (up to _PASSES passes).
            # Kicked at once, a batch carried what one pass made: under load, the batches
            # came smaller and more of them (their cost per call more than what the callback
            # saved). A lone caller's next call waits one pass.
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._kick_after, len(self._queue), _PASSES)

    def _kick_after(self, seen: int, passes: int) -> None:
        queued = len(self._queue)
        if seen < queued < self._limit and passes > 1:
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._kick_after, queued, passes - 1)
        else:
            self._kick()

    @staticmethod
    async def _give_back(
        give_back: Callable[[T, R], Awaitable[None]], answered: list[tuple[T, R]]
    ) -> None:
        for item, value in answered:
            await give_back(item, value)

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


class _Sent(Generic[T, R]):
    """A batch ``start`` sent, until its ``Finish``: it holds a slot as a task would."""

    __slots__ = ("batch", "owner")

    def __init__(self, owner: Pipeliner[T, R], batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.owner = owner
        self.batch = batch

    def finish(self, outcome: list[R | Exception] | Exception | None) -> None:
        self.owner._finished(self, outcome)
