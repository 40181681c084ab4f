"""``Pipeliner``'s ``start`` hook: a batch sent without a task holds the slot as a task would,
gets its outcome from a callback, and one handed back goes through ``write`` on a task, in
the same slot. ``drain`` waits for all of it."""

from __future__ import annotations

import asyncio

import pytest

from oncely.stores._redis_batch import Finish, Pipeliner

pytestmark = pytest.mark.anyio


class Wire:
    """A ``start`` whose batches are answered (or handed back) when the test says."""

    def __init__(self) -> None:
        self.out: list[tuple[list[int], Finish[int]]] = []
        self.written: list[list[int]] = []
        self.sent = asyncio.Event()

    def start(self, items: list[int], finish: Finish[int]) -> bool:
        self.out.append((items, finish))
        self.sent.set()
        return True

    async def write(self, items: list[int]) -> list[int | Exception]:
        self.written.append(list(items))
        return [item * 100 for item in items]

    async def next_out(self) -> tuple[list[int], Finish[int]]:
        await asyncio.wait_for(self.sent.wait(), 10)
        self.sent.clear()
        return self.out[-1]


async def test_a_started_batch_holds_the_slot_until_its_outcome() -> None:
    wire = Wire()
    batcher: Pipeliner[int, int] = Pipeliner(wire.write, limit=8, in_flight=1, start=wire.start)
    first = asyncio.ensure_future(batcher.submit(1))
    items, finish = await wire.next_out()
    assert items == [1]
    later = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert len(wire.out) == 1  # the slot is taken: the others wait
    finish([10])
    assert await first == 10
    items, finish = await wire.next_out()
    assert items == [2, 3]
    finish([20, ValueError("only 3")])
    assert await later[0] == 20
    with pytest.raises(ValueError, match="only 3"):
        await later[1]
    assert wire.written == []


async def test_a_batch_handed_back_is_written_on_a_task_in_its_slot() -> None:
    wire = Wire()
    batcher: Pipeliner[int, int] = Pipeliner(wire.write, limit=8, in_flight=1, start=wire.start)
    first = asyncio.ensure_future(batcher.submit(1))
    _, finish = await wire.next_out()
    later = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    finish(None)
    assert await first == 100  # through write
    assert wire.written == [[1]]
    items, finish = await wire.next_out()  # the next batch only after it
    assert items == [2]
    finish(RuntimeError("down"))
    with pytest.raises(RuntimeError, match="down"):
        await later


async def test_drain_waits_for_a_started_batch_and_one_handed_back() -> None:
    wire = Wire()
    batcher: Pipeliner[int, int] = Pipeliner(wire.write, limit=8, in_flight=1, start=wire.start)
    call = asyncio.ensure_future(batcher.submit(1))
    _, finish = await wire.next_out()
    drained = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    asyncio.get_running_loop().call_soon(finish, None)  # handed back, as a lost connection is
    await asyncio.wait_for(drained, 10)  # returns once the task wrote it
    assert call.done() and call.result() == 100
