"""``Pipeliner`` looks the running loop up only while no batch is under way: on Python 3.11
``asyncio.get_running_loop()`` is a ``getpid`` system call, which every ``begin`` and
``complete`` of the Redis and PostgreSQL stores paid."""

from __future__ import annotations

import asyncio
import sys

import pytest

from oncely.stores._redis_batch import Pipeliner

pytestmark = pytest.mark.anyio


async def test_calls_while_a_batch_is_out_do_not_look_the_loop_up_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = asyncio.Event()
    writing = asyncio.Event()
    batches: list[list[int]] = []

    async def write(items: list[int]) -> list[int | Exception]:
        batches.append(list(items))
        writing.set()
        await release.wait()
        return [item * 10 for item in items]

    lookups = 0
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal lookups
        if sys._getframe(1).f_globals["__name__"] == "oncely.stores._redis_batch":
            lookups += 1
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    batcher: Pipeliner[int, int] = Pipeliner(write, limit=8, in_flight=1)
    first = asyncio.ensure_future(batcher.submit(1))
    await writing.wait()
    looked_up = lookups
    later = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 12)]
    await asyncio.sleep(0)
    assert lookups == looked_up  # ten calls while the first batch is out: no lookup
    release.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [i * 10 for i in range(2, 12)]
    assert batches == [[1], list(range(2, 10)), [10, 11]]
    await batcher.drain()


async def test_calls_while_every_slot_is_taken_schedule_no_kick() -> None:
    # With the one slot taken, the batch that frees it sends the next: a kick scheduled per
    # tick meanwhile found no slot and cost the loop a callback per call under load.
    release = asyncio.Event()
    writing = asyncio.Event()
    batches: list[list[int]] = []

    async def write(items: list[int]) -> list[int | Exception]:
        batches.append(list(items))
        writing.set()
        await release.wait()
        return [item * 10 for item in items]

    batcher: Pipeliner[int, int] = Pipeliner(write, limit=8, in_flight=1)
    kicks = 0
    kick = batcher._kick

    def counting() -> None:
        nonlocal kicks
        kicks += 1
        kick()

    batcher._kick = counting  # type: ignore[method-assign]
    first = asyncio.ensure_future(batcher.submit(1))
    await writing.wait()
    assert kicks == 1
    later = []
    for i in range(2, 7):  # one call per loop pass, as a worker's handlers make them
        later.append(asyncio.ensure_future(batcher.submit(i)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert kicks == 1
    release.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [i * 10 for i in range(2, 7)]
    assert batches == [[1], [2, 3, 4, 5, 6]]
    assert kicks == 2
    await batcher.drain()
