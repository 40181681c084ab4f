"""A ``Pipeliner`` whose event loop closed with a batch under way serves the next loop.

A loop can close with a batch out or scheduled: a store call made by a task the loop's
shutdown cancelled (a handler's give-back), or an embedded worker's loop torn down. That
batch never answers, and its callers are gone with the loop; it must not hold the batcher's
only slot for good, nor tie later calls to the closed loop."""

from __future__ import annotations

import asyncio

from oncely.stores._redis_batch import Pipeliner


def _stuck_after_loop_closes() -> Pipeliner[int, int]:
    async def write(items: list[int]) -> list[int | Exception]:
        if items == [1]:
            await asyncio.Event().wait()  # the server never answers before the loop ends
        return [item * 10 for item in items]

    batcher: Pipeliner[int, int] = Pipeliner(write, limit=8, in_flight=1)
    callers: list[asyncio.Future[int]] = []

    async def shutting_down() -> None:
        # A call issued as the loop shuts down: asyncio.run cancels the caller, and the batch
        # it scheduled is written on the loop's last passes, then left pending.
        callers.append(asyncio.ensure_future(batcher.submit(1)))

    asyncio.run(shutting_down())
    assert callers[0].cancelled()
    return batcher


def test_calls_on_the_next_loop_get_their_answers() -> None:
    batcher = _stuck_after_loop_closes()

    async def next_loop() -> list[int]:
        calls = [batcher.submit(i) for i in (2, 3)]
        return await asyncio.wait_for(asyncio.gather(*calls), 10)

    assert asyncio.run(next_loop()) == [20, 30]
    assert asyncio.run(next_loop()) == [20, 30]  # and again on a third loop


def test_drain_on_the_next_loop_does_not_wait_for_the_dead_batch() -> None:
    batcher = _stuck_after_loop_closes()

    async def close_on_next_loop() -> int:
        await asyncio.wait_for(batcher.drain(), 10)
        return await asyncio.wait_for(batcher.submit(4), 10)

    assert asyncio.run(close_on_next_loop()) == 40
