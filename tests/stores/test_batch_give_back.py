"""The store batchers (GroupCommit for SQLite/PostgreSQL, Pipeliner for Redis) answer every
waiter of a batch before they give back what a cancelled waiter abandoned: a give-back is a
call of its own (a round trip, perhaps a wait for a pooled connection) and the others' answers
are already in hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oncely._batch import GroupCommit
from oncely.stores._redis_batch import Pipeliner


def _batchers(write: Any, abandoned: Any) -> list[GroupCommit[str, str] | Pipeliner[str, str]]:
    return [
        GroupCommit(write, limit=8, abandoned=abandoned),
        Pipeliner(write, limit=8, in_flight=2, abandoned=abandoned),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [0, 1], ids=["group-commit", "pipeliner"])
async def test_waiters_get_their_answers_while_an_abandoned_item_is_given_back(
    kind: int, anyio_backend: object
) -> None:
    writing = asyncio.Event()
    may_answer = asyncio.Event()
    give_back_may_finish = asyncio.Event()
    batches: list[list[str]] = []
    given_back: list[tuple[str, str]] = []

    async def write(items: list[str]) -> list[str]:
        batches.append(list(items))
        writing.set()
        await may_answer.wait()
        return [f"granted {item}" for item in items]

    async def abandoned(item: str, value: str) -> None:
        given_back.append((item, value))
        await give_back_may_finish.wait()  # a slow give-back (a hung or busy server)

    batcher = _batchers(write, abandoned)[kind]
    cancelled = asyncio.ensure_future(batcher.submit("a"))
    waiting = asyncio.ensure_future(batcher.submit("b"))
    await asyncio.wait_for(writing.wait(), 10)
    assert batches == [["a", "b"]]
    cancelled.cancel()
    may_answer.set()
    try:
        # The give-back of "a" is still running; "b" has its answer regardless.
        assert await asyncio.wait_for(asyncio.shield(waiting), 10) == "granted b"
        assert given_back == [("a", "granted a")]
    finally:
        give_back_may_finish.set()
        await batcher.drain()
    assert cancelled.cancelled()


@pytest.mark.anyio
async def test_a_slow_give_back_does_not_hold_the_next_batch_back(anyio_backend: object) -> None:
    # With one batch in flight, a give-back run in the batch's slot (a round trip per
    # abandoned item, each up to a socket or command timeout) held every later call back:
    # completes and renewals of other runs too.
    give_back_may_finish = asyncio.Event()
    giving_back = asyncio.Event()
    may_answer = asyncio.Event()
    writing = asyncio.Event()

    async def write(items: list[str]) -> list[str | Exception]:
        writing.set()
        await may_answer.wait()
        return [f"granted {item}" for item in items]

    async def abandoned(item: str, value: str) -> None:
        giving_back.set()
        await give_back_may_finish.wait()

    batcher: Pipeliner[str, str] = Pipeliner(write, limit=8, in_flight=1, abandoned=abandoned)
    cancelled = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.wait_for(writing.wait(), 10)
    cancelled.cancel()
    may_answer.set()
    try:
        await asyncio.wait_for(giving_back.wait(), 10)
        assert await asyncio.wait_for(batcher.submit("b"), 10) == "granted b"
        draining = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0)
        assert not draining.done(), "drain() must wait for the give-back"
    finally:
        give_back_may_finish.set()
        await batcher.drain()
    assert cancelled.cancelled()
