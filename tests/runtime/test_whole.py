"""``whole``: a coroutine a cancel must not cut short, run on the caller's task."""

from __future__ import annotations

import asyncio

import pytest

from oncely.runtime._whole import whole

pytestmark = pytest.mark.anyio


async def test_a_coroutine_that_never_suspends_runs_inline_and_returns_its_value() -> None:
    tasks_before = len(asyncio.all_tasks())

    async def quick() -> int:
        assert len(asyncio.all_tasks()) == tasks_before  # no task of its own
        return 7

    handed: list[asyncio.Task[int]] = []
    assert await whole(quick(), handed.append) == 7
    assert handed == []


async def test_suspensions_resume_in_order_and_errors_propagate() -> None:
    steps: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(0)
        steps.append("checkpoint")
        await asyncio.sleep(0.01)
        steps.append("timer")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await whole(slow(), lambda _: None)
    assert steps == ["checkpoint", "timer"]


async def test_a_cancel_hands_the_rest_to_a_task_and_never_cancels_what_it_waits_on() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    later = asyncio.Event()
    entered = asyncio.Event()
    steps: list[str] = []

    async def settle() -> str:
        entered.set()
        got = await gate  # the cancel must not reach this future
        steps.append(got)
        await later.wait()  # and the rest still suspends and resumes normally
        steps.append("after")
        return "done"

    handed: list[asyncio.Task[str]] = []

    async def run() -> str:
        return await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not gate.cancelled()
    (rest,) = handed
    assert not rest.done()
    gate.set_result("gate")
    later.set()
    assert await rest == "done"
    assert steps == ["gate", "after"]


async def test_a_cancel_at_a_bare_checkpoint_hands_the_rest_over_too() -> None:
    entered = asyncio.Event()
    steps: list[str] = []

    async def settle() -> None:
        entered.set()
        await asyncio.sleep(0)
        steps.append("resumed")

    handed: list[asyncio.Task[None]] = []

    async def run() -> None:
        await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await entered.wait()  # settle() now sits at its checkpoint
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rest,) = handed
    await rest
    assert steps == ["resumed"]


async def test_a_cancel_after_the_awaited_future_is_done_still_finishes_the_rest() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()
    steps: list[str] = []

    async def settle() -> None:
        entered.set()
        await gate
        steps.append("after gate")

    handed: list[asyncio.Task[None]] = []

    async def run() -> None:
        await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await entered.wait()
    gate.set_result(None)  # the proxy is resolved on the next loop turn, the cancel lands first
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rest,) = handed
    await rest
    assert steps == ["after gate"]


async def test_the_rest_task_cancelled_cancels_the_coroutine_where_it_waits() -> None:
    entered = asyncio.Event()
    seen: list[str] = []

    async def settle() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    handed: list[asyncio.Task[None]] = []

    async def run() -> None:
        await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == []  # the caller's cancel did not reach it
    (rest,) = handed
    rest.cancel()  # as asyncio.run() cancels every task left at exit
    with pytest.raises(asyncio.CancelledError):
        await rest
    assert seen == ["cancelled inside"]


async def test_the_caller_wakes_on_the_loop_pass_the_awaited_future_wakes_it() -> None:
    # A proxy future resolved by the awaited one's callback woke the caller a pass later:
    # an extra pass of the loop per suspension, on every message's store and ack path.
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def settle() -> int:
        return await gate

    async def run() -> int:
        return await whole(settle(), lambda _: None)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)  # run() now waits on the gate
    gate.set_result(5)
    await asyncio.sleep(0)  # one pass: the wake-up the gate scheduled has run
    assert task.done()
    assert task.result() == 5


async def test_a_cancel_of_the_awaited_future_reaches_the_coroutine_not_the_caller() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def settle() -> str:
        try:
            return await gate
        except asyncio.CancelledError:
            return "recovered"  # its owner gave up on it: coro handles that itself

    handed: list[asyncio.Task[str]] = []

    async def run() -> str:
        return await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    gate.cancel()
    assert await task == "recovered"
    assert handed == []


async def test_the_caller_sees_the_message_its_cancel_carried() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def settle() -> None:
        await gate

    handed: list[asyncio.Task[None]] = []

    async def run() -> None:
        await whole(settle(), handed.append)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    task.cancel("shutting down")
    with pytest.raises(asyncio.CancelledError, match="shutting down"):
        await task
    gate.set_result(None)
    await handed[0]


async def test_an_error_of_the_awaited_future_is_raised_where_the_coroutine_waits() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def settle() -> str:
        try:
            return await gate
        except ValueError as exc:
            return f"handled {exc}"

    async def run() -> str:
        return await whole(settle(), lambda _: None)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    gate.set_exception(ValueError("bad reply"))
    assert await task == "handled bad reply"
