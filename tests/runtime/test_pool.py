"""The worker runs deliveries on long-lived tasks: what one delivery does stays its own."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

import oncely
from tests._wait import eventually

pytestmark = pytest.mark.anyio

FAST = oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.02)
request_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_id", default=None)
fresh: contextvars.ContextVar[int] = contextvars.ContextVar("fresh")


async def test_context_variables_do_not_leak_into_the_next_delivery(unique: str) -> None:
    app = oncely.App()
    seen: list[tuple[int | None, bool]] = []

    @app.handler("ctx", concurrency=1)
    async def handle(n: int) -> None:
        seen.append((request_id.get(), fresh.get(None) is None))
        request_id.set(n)
        fresh.set(n)  # a variable the consuming task never had

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for n in range(5):
            await app.publish("ctx", n)
        await eventually(lambda: worker.stats.processed == 5)
    assert seen == [(None, True)] * 5


async def test_a_timeout_or_a_failure_leaves_the_next_delivery_alone(unique: str) -> None:
    app = oncely.App()
    runs: list[int] = []
    release = asyncio.Event()

    @app.handler("slow", concurrency=1, timeout=0.2, retry=FAST)
    async def handle(n: int) -> None:
        runs.append(n)
        if n == 0 and runs.count(0) == 1:
            await release.wait()  # past the timeout: cancelled, then retried
        if n == 1 and runs.count(1) == 1:
            raise RuntimeError("once")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for n in range(4):
            await app.publish("slow", n)
        await eventually(lambda: worker.stats.processed == 4)
        assert worker.stats.retried == 2
        assert worker.in_flight == 0
    assert sorted(runs) == [0, 0, 1, 1, 2, 3]


async def test_stop_cancels_a_running_handler_and_gives_its_message_back(unique: str) -> None:
    app = oncely.App()
    started = asyncio.Event()
    cancelled: list[int] = []

    @app.handler("stuck", concurrency=2)
    async def handle(n: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    url = f"memory://{unique}"
    broker = oncely.broker_from_url(url)
    async with broker:
        worker = oncely.Worker(app, broker=broker)
        await worker.start()
        await app.publish("stuck", 7)
        await asyncio.wait_for(started.wait(), 10)
        await worker.stop(grace=0.05)
        assert cancelled == [7]
        assert worker.stats.cancelled == 1 and worker.in_flight == 0
        async with broker.consume("stuck", prefetch=1, visibility=30) as sub:
            again = await asyncio.wait_for(sub.__anext__(), 10)
            assert again.body == b"7"
            await again.ack()


async def test_one_task_runs_delivery_after_delivery_and_a_task_it_started_keeps_no_fields(
    unique: str,
) -> None:
    # The runtime leaves an emptied log-fields list in the task's context after a delivery
    # (no reset): the context must still compare equal, or every delivery would get a new
    # task; and a task the handler started must not carry the message's fields once it ended.
    from oncely._logging import MESSAGE

    app = oncely.App()
    tasks: list[asyncio.Task[object] | None] = []
    during: list[bool] = []
    after: list[bool] = []
    go_on = asyncio.Event()

    async def spawned() -> None:
        during.append(bool(MESSAGE.get()))
        await go_on.wait()
        after.append(bool(MESSAGE.get()))

    started: list[asyncio.Task[None]] = []

    @app.handler("same-task", concurrency=1)
    async def handle(n: int) -> None:
        tasks.append(asyncio.current_task())
        if n == 0:
            started.append(asyncio.create_task(spawned()))
            await asyncio.sleep(0)

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for n in range(5):
            await app.publish("same-task", n)
        await eventually(lambda: worker.stats.processed == 5)
        go_on.set()
        await started[0]
    assert len(tasks) == 5 and len(set(map(id, tasks))) == 1
    assert during == [True] and after == [False]
