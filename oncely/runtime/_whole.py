"""Awaiting a coroutine that a cancel must not cut short, without a task per call.

``asyncio.shield`` needs the work in a task of its own: on the worker's hot path (record the
completion, then ack, for every delivery) creating that task, scheduling it and the shield's
callbacks cost as much as the rest of the store path (cProfile, memory broker and store).

``await Whole(coro, on_cancel)`` runs ``coro`` on the caller's own task instead, and for each of its
suspensions makes the task wait on a proxy future that the awaited future resolves. A cancel
of the caller then cancels only the proxy, never the future ``coro`` waits on (a lock, a
store reply, a broker confirm). Should that happen, ``coro`` is handed, suspended where it is,
to a new task that resumes it once its future is done and runs it to the end; ``on_cancel``
gets that task, and the caller sees ``CancelledError`` as with ``asyncio.shield``. A
coroutine that finishes without suspending (the memory store and broker) costs no future at
all.

Only for coroutines that never cancel their own task: an ``asyncio.timeout`` inside ``coro``
(redis-py's socket timeout, the AMQP adapter's publish timeout; on Python 3.12+ every
``wait_for``) cancels the caller's task when it fires, which ``Whole`` cannot tell from the
caller being cancelled: the rest would be handed off with the timeout lost, waiting for ever
on what it timed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

__all__ = ["Whole"]

T = TypeVar("T")


class Whole(Generic[T]):
    """Await ``coro`` to its end whatever cancel arrives meanwhile (see the module docstring).

    Args:
        coro: a coroutine not started yet.
        on_cancel: called, if the caller is cancelled before ``coro`` ends, with the task
            that runs the rest of ``coro``; the caller's ``CancelledError`` follows at once.
    """

    __slots__ = ("_coro", "_on_cancel")

    def __init__(
        self, coro: Coroutine[Any, Any, T], on_cancel: Callable[[asyncio.Task[T]], None]
    ) -> None:
        self._coro = coro
        self._on_cancel = on_cancel

    def __await__(self) -> Generator[Any, None, T]:
        coro = self._coro
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            return cast("T", stop.value)
        while True:
            # What the coroutine yields is what a task would wait on: an asyncio future
            # (flagged ``_asyncio_future_blocking``), ``None`` for a bare yield (a checkpoint),
            # or something foreign, which the task answers by throwing an error back in.
            future = getattr(waiting, "_asyncio_future_blocking", None) is not None
            try:
                if future:
                    waiting._asyncio_future_blocking = False
                    proxy = waiting.get_loop().create_future()
                    wake = _waker(proxy)
                    waiting.add_done_callback(wake)
                    proxy._asyncio_future_blocking = True
                    try:
                        yield proxy
                    except BaseException:
                        waiting.remove_done_callback(wake)
                        raise
                else:
                    yield waiting
            except asyncio.CancelledError:
                # The caller is cancelled: the rest runs on a task of its own.
                loop = asyncio.get_running_loop()
                self._on_cancel(loop.create_task(_rest(coro, waiting if future else None)))
                raise
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return cast("T", stop.value)
                continue
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                return cast("T", stop.value)


def _waker(proxy: asyncio.Future[None]) -> Callable[[object], None]:
    def wake(_: object) -> None:
        if not proxy.done():
            proxy.set_result(None)

    return wake


async def _rest(coro: Coroutine[Any, Any, T], waiting: Any) -> T:
    """Run the rest of ``coro``, suspended waiting on the future ``waiting`` (or on nothing)."""
    return await _Resumed(coro, waiting)


class _Resumed(Generic[T]):
    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, None, T]:
        # Plain delegation, as ``await`` does: a cancel of this task cancels the future it
        # waits on, and the coroutine sees that there, as it would have without ``Whole``.
        coro, waiting = self._coro, self._waiting
        resume_now = waiting is None or waiting.done()
        if not resume_now:
            waiting._asyncio_future_blocking = True
        while True:
            if not resume_now:
                try:
                    yield waiting
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:
                    try:
                        waiting = coro.throw(exc)
                    except StopIteration as stop:
                        return cast("T", stop.value)
                    continue
            resume_now = False
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                return cast("T", stop.value)
