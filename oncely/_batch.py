"""Group commit: many concurrent callers share one write. Used by the SQLite and PostgreSQL
stores and the SQLite broker alike; nothing here knows the database."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["GroupCommit", "copy_error"]

T = TypeVar("T")
R = TypeVar("R")
E = TypeVar("E", bound=BaseException)


class GroupCommit(Generic[T, R]):
    """Group commit: calls that arrive while a batch is being written share the next write,
    so many concurrent callers cost one statement (one thread hop, one commit) instead of one
    each, while every caller still waits for, and gets, its own outcome.

    A write runs as soon as the previous one is done, so a lone call is not delayed.

    Args:
        write: writes one batch and returns one outcome per item, in order: a value, or an
            exception that fails that item alone. An exception it raises fails every item of
            the batch with a copy of it, so it must not raise once part of the batch is
            committed and reportable: a caller may be told "unknown", never "done" for
            something that was not.
        limit: the most items one write gets.
        abandoned: awaited with an item and its value when the caller stopped waiting
            (was cancelled) before it got that value, e.g. to give back a lease nobody will
            use. It must not raise.
    """

    __slots__ = ("_abandoned", "_limit", "_queue", "_task", "_write")

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        limit: int,
        abandoned: Callable[[T, R], Awaitable[None]] | None = None,
    ) -> None:
        self._write = write
        self._limit = limit
        self._abandoned = abandoned
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next write and return its outcome; raises its error."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._flush())
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled after the outcome arrived but before this task resumed: the value
            # is lost to the caller, so it counts as abandoned. (Cancelled earlier, the
            # future is cancelled too, and _flush sees to it.)
            abandoned = self._abandoned
            if abandoned is not None and fut.done() and not fut.cancelled():
                if fut.exception() is None:
                    await asyncio.shield(abandoned(item, fut.result()))
            raise

    async def drain(self) -> None:
        """Wait until every queued item has been written (or failed)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._limit]
                del self._queue[: self._limit]
                try:
                    outcomes = await self._write([item for item, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        _fail(fut, exc)
                    continue
                for (item, fut), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        if not fut.done():
                            fut.set_exception(outcome)
                    elif not fut.done():
                        fut.set_result(outcome)
                    elif self._abandoned is not None:
                        await self._abandoned(item, outcome)
                batch = []
        except BaseException:
            # This task was cancelled (the loop is shutting down): nobody writes these now.
            for _, fut in (*batch, *self._queue):
                fut.cancel()
            self._queue.clear()
            raise
        finally:
            self._task = None


def _fail(fut: asyncio.Future[R], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(copy_error(exc))


def copy_error(exc: E) -> E:
    """One waiter's own copy of a batch's error, cause kept: each raise appends its frames to
    the traceback of the instance it raises, so waiters must not share one."""
    try:
        err = copy.copy(exc)
    except Exception:
        return exc
    err.__cause__ = exc.__cause__
    return err
