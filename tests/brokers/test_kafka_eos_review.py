"""Exactly-once failure paths found in review: a rewind after a failed transaction, and the
outputs held while a commit is slow. Real Kafka, one partition each."""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import AlreadySettled, DeliveryExpired
from tests.brokers.kafka_support import create_small_topic, kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

TOO_BIG = b"x" * 4096
"""Over the ``refused`` topic's max.message.bytes: the broker refuses the batch, so the
transaction fails at its commit."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_partition_paused_by_a_full_window_runs_again_after_a_failed_transaction(
    unique: str,
) -> None:
    """A transaction that fails rewinds its partition to the committed offset. If the full
    window had paused the partition, the rewound one must be fetched again: left paused, it
    would never deliver another record while the member went on polling."""
    out, refused = f"{unique}-out", f"{unique}-refused"
    await create_small_topic(refused, 1024)
    url = kafka_url(exactly_once=unique, window=1, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out, refused])
        for body in (b"a", b"b", b"c"):
            await broker.publish(unique, body)
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(first, ExactlyOnceDelivery) and first.body == b"a"
            await first.produce(refused, TOO_BIG)
            with pytest.raises(DeliveryExpired):
                await first.ack()  # the commit fails: the partition starts over
            for body in (b"a", b"b", b"c"):
                again = await asyncio.wait_for(sub.__anext__(), 30)
                assert isinstance(again, ExactlyOnceDelivery) and again.body == body
                await again.produce(out, b"out-" + body)
                await again.ack()
    assert [r.value for r in await read_topic(out)] == [b"out-a", b"out-b", b"out-c"]


async def test_a_slow_commit_pauses_the_partition_instead_of_piling_up_outputs(
    unique: str,
) -> None:
    """While a transaction commits, later acks pass their records into the next one. Those
    outputs wait in memory, so they must count in the window: a commit that takes long (its
    lock held here, as a slow broker would) pauses the partition at ``window`` records past
    the transaction's budget rather than fetching and holding outputs without bound. Once
    it is done, everything is committed, each output once and in order."""
    out = f"{unique}-out"
    window, budget, n = 4, 1, 40
    url = kafka_url(exactly_once=unique, window=window, txn_messages=budget)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        for i in range(n):
            await broker.publish(unique, str(i).encode())
        async with broker.consume(unique, prefetch=n, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(first, ExactlyOnceDelivery)
            txn = first.track.eos
            acked = 0
            async with txn.lock:  # a commit in flight
                delivery: ExactlyOnceDelivery | None = first
                while delivery is not None:
                    await delivery.produce(out, b"out-" + delivery.body)
                    await delivery.ack()
                    acked += 1
                    try:
                        got = await asyncio.wait_for(sub.__anext__(), 3)
                    except TimeoutError:
                        delivery = None  # paused: the window is full
                    else:
                        assert isinstance(got, ExactlyOnceDelivery)
                        delivery = got
                assert acked <= window + budget, f"{acked} outputs held behind one commit"
                assert len(txn.pending) <= window + budget
            while acked < n:
                rest = await asyncio.wait_for(sub.__anext__(), 15)
                assert isinstance(rest, ExactlyOnceDelivery)
                await rest.produce(out, b"out-" + rest.body)
                await rest.ack()
                acked += 1
    assert [r.value for r in await read_topic(out)] == [f"out-{i}".encode() for i in range(n)]


async def test_a_commit_cancelled_half_way_is_resolved_before_anything_commits(
    unique: str,
) -> None:
    """An ack's task cancelled while its transaction commits (so is the poll loop's at
    close) leaves the producer inside a transaction whose outputs were dropped. No later
    commit may go on that producer: the partition starts over from the committed offset, and
    every output still shows exactly once."""
    out = f"{unique}-out"
    url = kafka_url(exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        for body in (b"a", b"b"):
            await broker.publish(unique, body)  # no key: both run at once
        async with broker.consume(unique, prefetch=2, visibility=30) as sub:
            first, second = [await asyncio.wait_for(sub.__anext__(), 15) for _ in range(2)]
            assert isinstance(first, ExactlyOnceDelivery)
            assert isinstance(second, ExactlyOnceDelivery)
            txn = first.track.eos
            await first.produce(out, b"out-a")
            acking = asyncio.create_task(first.ack())
            # Step the loop until the transaction is open: it cannot end within one step (its
            # commit takes several round trips to the broker), so the cancel lands inside it.
            deadline = asyncio.get_running_loop().time() + 15
            while not txn.open:
                assert asyncio.get_running_loop().time() < deadline, "no transaction began"
                await asyncio.sleep(0)
            acking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await acking
            await second.produce(out, b"out-b")
            with pytest.raises(DeliveryExpired):
                await second.ack()  # its partition starts over
            for body in (b"a", b"b"):
                again = await asyncio.wait_for(sub.__anext__(), 30)
                assert isinstance(again, ExactlyOnceDelivery) and again.body == body
                await again.produce(out, b"out-" + body)
                await again.ack()
    assert sorted(r.value for r in await read_topic(out)) == [b"out-a", b"out-b"]


async def test_a_produce_that_outlives_its_ack_fails_instead_of_vanishing(unique: str) -> None:
    """A handler's ``produce`` still creating its topic when the delivery is acked (one it
    did not await) comes back after the record's outputs went to the transaction: it must
    fail, not return an id for a record that is never sent."""
    url = kafka_url(exactly_once=unique)
    async with KafkaBroker.from_url(url) as broker:
        await broker.publish(unique, b"a")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            # gather starts the produce first: it waits on creating the new topic while the
            # ack runs.
            produced, acked = await asyncio.gather(
                delivery.produce(f"{unique}-new", b"late"), delivery.ack(), return_exceptions=True
            )
            assert acked is None
            assert isinstance(produced, AlreadySettled), produced
