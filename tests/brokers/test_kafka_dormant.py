"""Exactly-once retry-topic partitions stay dormant (no transactional producer, no offset
read) until a record of theirs is fetched; then they are taken like an input partition
(fence, read the committed offset) and their records run exactly once. Real Kafka."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import TopicPartition

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers._kafka_options import retry_topic
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url, read_topic
from tests.brokers.test_kafka import committed_offsets
from tests.brokers.test_kafka_eos import eventually_offsets_within

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_retry_partition_gets_its_producer_with_its_first_record(unique: str) -> None:
    group, out = f"g-{unique}", f"{unique}-out"
    retry = TopicPartition(retry_topic(unique, 1.0), 0)
    async with KafkaBroker.from_url(kafka_url(group, exactly_once=unique)) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"a")
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(first, ExactlyOnceDelivery)
            eos = sub._eos
            assert eos is not None
            assert set(eos._txns) == {TopicPartition(unique, 0)}  # the retry ones: dormant
            assert retry in eos._dormant and len(eos._dormant) == len(broker.options.buckets)
            await first.nack(0.5)  # its copy goes to the 1s retry topic in the transaction
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert isinstance(again, ExactlyOnceDelivery)
            assert (again.id, again.body, again.attempt) == (first.id, b"a", 2)
            assert again.record.topic == retry.topic
            eos = sub._eos
            assert eos is not None and retry in eos._txns and retry not in eos._dormant
            await again.produce(out, b"out-a")
            await again.ack()
        assert set(eos._txns) == set() and eos._waking == {}
    assert [r.value for r in await read_topic(out)] == [b"out-a"]
    # Committed in the ack's transaction: Kafka answers the commit before its markers reach
    # the group's offsets, and until they do the group still reads the previous offset.
    await eventually_offsets_within(group, retry.topic, {0: 1}, 30)
    assert await committed_offsets(group, unique) == {0: 1}


async def test_closing_while_a_retry_partition_is_being_taken_stops_its_producer(
    unique: str,
) -> None:
    """A dormant partition woken just before the close: the take is stopped and no producer
    is left running."""
    async with KafkaBroker.from_url(kafka_url(exactly_once=unique)) as broker:
        await broker.publish(unique, b"a")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        first = await asyncio.wait_for(sub.__anext__(), 15)
        eos = sub._eos
        assert eos is not None
        retry = TopicPartition(retry_topic(unique, 1.0), 0)
        eos.wake(retry, 0)  # as a fetched record of it would
        assert retry in eos._waking
        await first.ack()
        await sub.aclose()
        assert eos._txns == {} and eos._waking == {} and eos._dormant == set()


async def test_a_retry_record_left_by_one_member_runs_once_at_the_next(unique: str) -> None:
    """A member takes a retry partition (its record is not due yet) and closes; the next
    member finds that partition dormant, takes it when the record is fetched, and runs the
    record once: only its output shows, and the retry partition's offset moves past it."""
    group, out = f"g-{unique}", f"{unique}-out"
    retry = TopicPartition(retry_topic(unique, 5.0), 0)
    url = kafka_url(group, exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"a")
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(first, ExactlyOnceDelivery)
            await first.nack(3.0)  # to the 5s retry topic, due in 3s; commits at once
            eos = sub._eos
            assert eos is not None
            txns = eos._txns
            await eventually(lambda: retry in txns, 30)  # taken: fetched, not due, held
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert isinstance(again, ExactlyOnceDelivery)
            assert (again.id, again.attempt, again.record.topic) == (first.id, 2, retry.topic)
            eos = sub._eos
            assert eos is not None and retry in eos._txns and retry not in eos._dormant
            await again.produce(out, b"out-a")
            await again.ack()
    assert [r.value for r in await read_topic(out)] == [b"out-a"]
    # Committed in the ack's transaction: Kafka answers the commit before its markers reach
    # the group's offsets, and until they do the group still reads the previous offset.
    await eventually_offsets_within(group, retry.topic, {0: 1}, 30)
