"""Awaiting a coroutine that a cancel must not cut short, without a task per call.

``asyncio.shield`` needs the work in a task of its own: on the worker's hot path (record the
completion, then ack, for every delivery) creating that task, scheduling it and the shield's
callbacks cost as much as the rest of the store path (cProfile, memory broker and store).

``await whole(coro, on_cancel)`` runs ``coro`` on the caller's own task instead, and for each of its
suspensions makes the task wait on a relay (``_Relay``) of the awaited future: the task's
wake-up goes straight onto that future, but a cancel of the caller reaches only the relay,
never the future ``coro`` waits on (a lock, a store reply, a broker confirm). Should that
happen, ``coro`` is handed, suspended where it is, to a new task that resumes it once its
future is done and runs it to the end; ``on_cancel`` gets that task, and the caller sees
``CancelledError`` as with ``asyncio.shield``. A coroutine that finishes without suspending
(the memory store and broker) costs no relay at all.

A relay rather than a proxy future that the awaited one resolves: a future's done callbacks
run on the loop's next pass, so a proxy woke the task one pass after the future was done,
and every suspension (a store's reply, a broker's ack confirm) cost an extra pass of the loop,
a future and a callback on every message.

Only for coroutines that never cancel their own task: an ``asyncio.timeout`` inside ``coro``
(redis-py's socket timeout, the AMQP adapter's publish timeout; on Python 3.12+ every
``wait_for``) cancels the caller's task when it fires, which ``whole`` cannot tell from the
caller being cancelled: the rest would be handed off with the timeout lost, waiting for ever
on what it timed out.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["whole"]

T = TypeVar("T")

_NO_ARG: Any = object()


@types.coroutine
def whole(
    coro: Coroutine[Any, Any, T],
    on_cancel: Callable[..., None],
    arg: Any = _NO_ARG,
    waiting: Any = _NO_ARG,
) -> Generator[Any, None, T]:
    """Await ``coro`` to its end whatever cancel arrives meanwhile (see the module docstring).

    A generator-based coroutine rather than an object with ``__await__``: one generator per
    call, no instance and no ``__init__`` frame (about 2 k instructions less per settle).

    Args:
        coro: a coroutine not started yet.
        on_cancel: called, if the caller is cancelled before ``coro`` ends, with the task
            that runs the rest of ``coro``; the caller's ``CancelledError`` follows at once.
        arg: if given, passed to ``on_cancel`` after the task, so a caller need not make a
            closure per call for a cancel that nearly never comes.
        waiting: if given, ``coro`` was started by the caller already (on this task, with no
            suspension in between), and its first step yielded this: a caller that steps it
            once itself needs no ``whole`` at all for a ``coro`` that ends at once.
    """
    if waiting is _NO_ARG:
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            done: T = stop.value
            return done
    while True:
        # What the coroutine yields is what a task would wait on: an asyncio future
        # (flagged ``_asyncio_future_blocking``), ``None`` for a bare yield (a checkpoint),
        # or something foreign, which the task answers by throwing an error back in.
        future = getattr(waiting, "_asyncio_future_blocking", None) is not None
        relay = None
        try:
            if future:
                waiting._asyncio_future_blocking = False
                relay = _Relay(waiting)
                yield relay
            else:
                yield waiting
        except GeneratorExit:
            if relay is not None:
                relay.detach()
            coro.close()
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and (
                relay is None or relay.cancel_requested
            ):
                # The caller is cancelled: the rest runs on a task of its own.
                loop = asyncio.get_running_loop()
                rest = loop.create_task(_rest(coro, waiting if future else None))
                if arg is _NO_ARG:
                    on_cancel(rest)
                else:
                    on_cancel(rest, arg)
                raise
            if relay is not None:
                # Nearly always the awaited future's own outcome, its wake-up spent: its
                # error, or its cancel (its owner gave up on it), which coro sees where it
                # waits, as with ``await``. Else something thrown in meanwhile, and the
                # wake-up must not come later.
                relay.detach()
            try:
                waiting = coro.throw(exc)
            except StopIteration as stop:
                done = stop.value
                return done
            continue
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            done = stop.value
            return done


class _Relay:
    """What the caller's task waits on for one suspension of ``coro``: a stand-in for the
    future ``coro`` waits on, as asyncio's tasks accept any object with the future protocol.

    The task's wake-up callback goes onto that future itself, so the task resumes on the same
    loop pass as if it awaited the future directly, and with its outcome (``whole`` throws an
    error into ``coro`` where it waits). The task's ``cancel()`` calls ``cancel()`` here, which
    takes the wake-up back off the future and wakes the task at once with a cancelled relay;
    the future itself is never cancelled. If the future is already done (the wake-up is on its
    way), the relay refuses the cancel, and the task raises it when it wakes, as it does for
    any future that could not be cancelled."""

    __slots__ = ("_asyncio_future_blocking", "_message", "_waiting", "_wakeup", "cancel_requested")

    def __init__(self, waiting: asyncio.Future[Any]) -> None:
        self._waiting = waiting
        self._asyncio_future_blocking = True
        self._wakeup: tuple[Callable[..., object], Any] | None = None
        self._message: Any = None
        self.cancel_requested = False

    def __repr__(self) -> str:  # a waiting task's repr shows it (``wait_for=``)
        return f"<whole relay of {self._waiting!r}>"

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._waiting.get_loop()

    def add_done_callback(self, fn: Callable[..., object], *, context: Any = None) -> None:
        self._wakeup = (fn, context)
        self._waiting.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[..., object]) -> int:
        return self._waiting.remove_done_callback(fn)

    def cancel(self, msg: Any = None) -> bool:
        self.cancel_requested = True
        wakeup = self._wakeup
        if wakeup is None or self._waiting.done():
            return False
        fn, context = wakeup
        self._wakeup = None
        self._message = msg
        self._waiting.remove_done_callback(fn)
        self._waiting.get_loop().call_soon(fn, self, context=context)
        return True

    def detach(self) -> None:
        """Take the task's wake-up back off the future (the caller is gone)."""
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            self._waiting.remove_done_callback(wakeup[0])

    def cancelled(self) -> bool:
        return self.cancel_requested and self._wakeup is None

    def done(self) -> bool:
        return self.cancelled() or self._waiting.done()

    def result(self) -> Any:
        if self.cancelled():
            raise self._cancelled_error()
        return self._waiting.result()

    def exception(self) -> BaseException | None:
        if self.cancelled():
            raise self._cancelled_error()
        return self._waiting.exception()

    def _cancelled_error(self) -> asyncio.CancelledError:
        # With the cancel's message, as a cancelled future gives it to its task.
        if self._message is None:
            return asyncio.CancelledError()
        return asyncio.CancelledError(self._message)


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
        # waits on, and the coroutine sees that there, as it would have without ``whole``.
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
                        done: T = stop.value
                        return done
                    continue
            resume_now = False
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                done = stop.value
                return done
