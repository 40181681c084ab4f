"""Releasing an exactly-once partition stops its transactional producer even when the release
is cancelled half way (a close or rebalance cut short): a producer left running keeps its
connections and background tasks, and a long-running worker's rebalances pile them up.
aiokafka's ``stop()`` marks the producer closed before it awaits anything, so a stop cut
short is never finished by a second one."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from oncely.brokers._kafka_txn import stop_producer
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from oncely.brokers._kafka_consume import KafkaSubscription
    from oncely.brokers._kafka_eos import ExactlyOnce
    from oncely.brokers._kafka_txn import Txn

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


def stopped(producer: AIOKafkaProducer) -> bool:
    """No background task and no open connection left."""
    client = producer.client
    sender = producer._sender.sender_task
    return (
        (sender is None or sender.done())
        and client._sync_task is None
        and not any(conn.connected() for conn in client._conns.values())
    )


async def taken(broker: KafkaBroker, topic: str) -> tuple[KafkaSubscription, ExactlyOnce, Txn]:
    """An exactly-once subscription holding ``topic``'s one partition, one record read."""
    await broker.publish(topic, b"x")
    # On Kafka, visibility is only how long a close waits for unsettled deliveries: the one
    # read here is never settled, so 30 s made every close (and test) 30 s longer.
    sub = broker.consume(topic, prefetch=8, visibility=1)
    async with asyncio.timeout(60):
        await anext(sub)
    eos = sub._eos
    assert eos is not None
    (txn,) = eos._txns.values()
    return sub, eos, txn


async def test_a_release_cancelled_while_waiting_for_the_lock_stops_the_producer(
    unique: str,
) -> None:
    """A commit holds the partition's lock when the release comes, and the release is
    cancelled while it waits: it had already taken the producer out of the owner's list, so
    not even the subscription's close stopped it."""
    url = kafka_url(partitions=1, auto_offset_reset="earliest", exactly_once=unique)
    async with KafkaBroker.from_url(url) as broker:
        sub, eos, txn = await taken(broker, unique)
        producer = txn.producer
        try:
            track = sub.tracks[txn.tp]
            await txn.lock.acquire()  # a commit under way
            release = asyncio.ensure_future(eos.release([track]))
            await eventually(lambda: txn.tp not in eos._txns)  # now waiting for the lock
            release.cancel()
            txn.lock.release()
            with pytest.raises(asyncio.CancelledError):
                await release
            await sub.aclose()
            assert stopped(producer), "the producer was left running"
        finally:
            await stop_producer(producer)


async def test_a_stop_cancelled_half_way_still_closes_the_producer(unique: str) -> None:
    """Cancelled while aiokafka's stop flushes, the stop finishes before the cancel goes on."""
    url = kafka_url(partitions=1, auto_offset_reset="earliest", exactly_once=unique)
    async with KafkaBroker.from_url(url) as broker:
        sub, _, txn = await taken(broker, unique)
        producer = txn.producer
        try:
            flushing = asyncio.Event()
            go_on = asyncio.get_running_loop().create_future()
            close = producer._message_accumulator.close

            async def held_close() -> None:
                flushing.set()
                await go_on
                await close()  # type: ignore[no-untyped-call]

            producer._message_accumulator.close = held_close  # type: ignore[method-assign]
            stop = asyncio.ensure_future(stop_producer(producer))
            await flushing.wait()
            stop.cancel()
            go_on.set_result(None)
            with pytest.raises(asyncio.CancelledError):
                await stop
            assert stopped(producer), "the producer was left running"
        finally:
            await sub.aclose()
            await producer._sender.close()  # type: ignore[no-untyped-call]
            await producer.client.close()  # type: ignore[no-untyped-call]
