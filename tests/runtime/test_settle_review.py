"""Per-delivery paths found in review: every delivery settles, once, and the worker stops."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

import oncely
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str


async def test_a_hanging_on_duplicate_hook_times_out_and_the_handler_goes_on(
    unique: str,
) -> None:
    app = oncely.App()
    hooks = 0
    seen: list[str] = []

    async def answer_again(result: None, ctx: oncely.Context) -> None:
        nonlocal hooks
        hooks += 1
        if hooks == 1:
            await asyncio.Event().wait()  # user code that never returns

    @app.handler(
        "t",
        idempotent=True,
        key="payload:id",
        concurrency=1,
        timeout=0.2,
        retry=oncely.RetryPolicy(base=0.01, jitter=False),
        on_duplicate=answer_again,
    )
    async def handle(order: Order) -> None:
        seen.append(order.id)

    async with oncely.Worker(app, broker=f"memory://{unique}", store="memory://") as worker:
        await app.publish("t", Order(id="a"))
        await eventually(lambda: seen == ["a"])
        await app.publish("t", Order(id="a"))  # its hook hangs: the timeout must apply
        await app.publish("t", Order(id="b"))
        await eventually(lambda: seen == ["a", "b"] and worker.stats.duplicates == 1)
    assert hooks == 2
    assert worker.stats.retried == 1
