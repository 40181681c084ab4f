"""The handler timeout: one timer per handler, armed for the oldest running delivery."""

from __future__ import annotations

import asyncio
import time

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.brokers.memory import MemoryBroker
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from tests._wait import eventually

pytestmark = pytest.mark.anyio


async def _hang() -> None:
    await asyncio.Event().wait()


async def test_a_delivery_that_ends_early_leaves_the_next_ones_timed_out_on_time() -> None:
    loop = asyncio.get_running_loop()
    heartbeat = Heartbeat("h", 30.0, extend=False, store=None, stats=Stats())
    async with MemoryBroker() as broker:
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=3, visibility=30)
        delivery = await sub.__anext__()
        tasks = [asyncio.create_task(_hang()) for _ in range(3)]
        first, second, third = (Active(delivery, task) for task in tasks)
        heartbeat.track(first, 0.2)  # arms the timer for its deadline
        # Second's deadline comes later. A blocking sleep, not an await: a stall of the loop
        # there (a loaded machine) could otherwise run the timer past first's deadline before
        # first is untracked, and time first out.
        time.sleep(0.05)  # noqa: ASYNC251 - no callback may run here
        heartbeat.track(second, 0.2)
        heartbeat.untrack(first)  # finished early: the timer stays armed for its deadline
        tracked_third = False

        def track_third() -> None:
            nonlocal tracked_third
            heartbeat.track(third, 0.2)
            tracked_third = True

        loop.call_later(0.1, track_third)
        await eventually(lambda: second.timed_out and third.timed_out, within=5)
        assert tracked_third and not first.timed_out
        assert second.deadline is not None and third.deadline is not None
        assert second.deadline < third.deadline
        for active in (second, third):
            assert active.task is not None
            await asyncio.gather(active.task, return_exceptions=True)
            assert active.task.cancelled()
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await sub.aclose()
    await heartbeat.aclose()


async def test_a_delivery_is_never_timed_out_before_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    heartbeat = Heartbeat("h", 30.0, extend=False, store=None, stats=Stats())
    cancelled_at: dict[int, float] = {}
    actives: list[Active] = []

    async def run(n: int) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled_at[n] = loop.time()
            raise

    async with MemoryBroker() as broker:
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=1, visibility=30)
        delivery = await sub.__anext__()
        for n in range(5):
            active = Active(delivery, asyncio.create_task(run(n)))
            heartbeat.track(active, 0.1)
            actives.append(active)
            await asyncio.sleep(0.02)
        await eventually(lambda: len(cancelled_at) == 5, within=5)
        for n, active in enumerate(actives):
            assert active.deadline is not None and cancelled_at[n] >= active.deadline
        await sub.aclose()
    await heartbeat.aclose()


async def test_a_quick_delivery_then_a_hanging_one_the_hanging_one_times_out(
    unique: str,
) -> None:
    app = oncely.App()
    quick_done = asyncio.Event()

    @app.handler("t", concurrency=2, timeout=0.3, retry=oncely.RetryPolicy(max_attempts=1))
    async def handle(n: int) -> None:
        if n == 0:
            quick_done.set()
            return
        await asyncio.Event().wait()

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("t", 0)
        await quick_done.wait()
        await app.publish("t", 1)
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("t")
    assert letter.reason.startswith("HandlerTimeout: handler ran past its 0.3s timeout")
    assert worker.stats.processed == 1
