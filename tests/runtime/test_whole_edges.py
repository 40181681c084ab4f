"""``whole``'s relay on the paths around a cancel (guards: they pass on the reviewed code).

What each checks is left behind too: no wake-up of the caller's task on the awaited future
once the caller has moved on, and the rest handed off exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oncely.runtime._whole import whole
from tests._wait import eventually

pytestmark = pytest.mark.anyio


def _attached(future: asyncio.Future[Any]) -> int:
    """Callbacks on ``future`` (the C future's list; ``None`` when empty)."""
    return len(future._callbacks or ())


async def _started(task: asyncio.Task[Any]) -> None:
    for _ in range(3):  # the task's first step, and the relay under it
        await asyncio.sleep(0)
    assert not task.done()


async def test_a_timeout_around_it_raises_timeout_error_and_the_rest_still_ends() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    handed: list[asyncio.Task[int]] = []

    async def settle() -> int:
        return await future

    async def caller() -> int:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await whole(settle(), handed.append)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert await caller() == 0  # the timeout's cancel was taken back
    assert len(handed) == 1
    future.set_result(5)
    assert await handed[0] == 5
    assert _attached(future) == 0


async def test_a_second_cancel_before_the_first_lands_hands_off_once() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    handed: list[asyncio.Task[int]] = []

    async def settle() -> int:
        return await future

    task = asyncio.ensure_future(whole(settle(), handed.append))
    await _started(task)
    task.cancel("first")
    task.cancel("second")
    with pytest.raises(asyncio.CancelledError, match="first"):
        await task
    assert task.cancelling() == 2
    assert len(handed) == 1
    future.set_result(6)
    assert await handed[0] == 6
    assert _attached(future) == 0


async def test_a_cancel_and_the_completion_in_one_pass() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    handed: list[asyncio.Task[int]] = []

    async def settle() -> int:
        return await future

    task = asyncio.ensure_future(whole(settle(), handed.append))
    await _started(task)
    task.cancel()
    future.set_result(7)  # after the cancel took the wake-up off: the rest gets the value
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await handed[0] == 7
    assert _attached(future) == 0


async def test_a_caller_that_swallows_its_cancel_is_not_woken_by_the_old_future() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    other: asyncio.Future[str] = loop.create_future()
    handed: list[asyncio.Task[int]] = []

    async def settle() -> int:
        return await future

    async def caller() -> str:
        try:
            await whole(settle(), handed.append)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
        return await other  # a stale wake-up from ``future`` would resume this too early

    task = asyncio.ensure_future(caller())
    await _started(task)
    task.cancel()
    await eventually(lambda: bool(handed))
    future.set_result(8)
    assert await handed[0] == 8
    assert not task.done()
    other.set_result("moved on")
    assert await task == "moved on"


async def test_nested_wholes_each_keep_what_they_wait_on_from_the_cancel() -> None:
    loop = asyncio.get_running_loop()
    inner_future: asyncio.Future[int] = loop.create_future()
    outer_future: asyncio.Future[int] = loop.create_future()
    handed: list[asyncio.Task[Any]] = []

    async def inner() -> int:
        return await inner_future

    async def outer() -> tuple[int, int]:
        first = await whole(inner(), handed.append)
        return first, await outer_future

    task = asyncio.ensure_future(whole(outer(), handed.append))
    await _started(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(handed) == 1  # the outer whole() handed off; the inner one was not cancelled
    rest = handed[0]
    await _started(rest)
    rest.cancel()  # the rest's cancel reaches the inner whole(), which hands its part off
    with pytest.raises(asyncio.CancelledError):
        await rest
    assert len(handed) == 2
    assert not inner_future.cancelled()
    inner_future.set_result(9)
    assert await handed[1] == 9
    assert not outer_future.done()  # the outer rest was cancelled: it never waits on this
