"""Exactly-once failure paths found in review: a rewind after a failed transaction, and the
outputs held while a commit is slow. Real Kafka, one partition each."""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import DeliveryExpired
from tests.brokers.kafka_support import kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

TOO_BIG = b"x" * (2 << 20)
"""Over the producer's max_request_size: the send fails, so the transaction does."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_partition_paused_by_a_full_window_runs_again_after_a_failed_transaction(
    unique: str,
) -> None:
    """A transaction that fails rewinds its partition to the committed offset. If the full
    window had paused the partition, the rewound one must be fetched again: left paused, it
    would never deliver another record while the member went on polling."""
    out = f"{unique}-out"
    url = kafka_url(exactly_once=unique, window=1, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        for body in (b"a", b"b", b"c"):
            await broker.publish(unique, body)
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(first, ExactlyOnceDelivery) and first.body == b"a"
            await first.produce(out, TOO_BIG)
            with pytest.raises(DeliveryExpired):
                await first.ack()  # the commit fails: the partition starts over
            for body in (b"a", b"b", b"c"):
                again = await asyncio.wait_for(sub.__anext__(), 30)
                assert isinstance(again, ExactlyOnceDelivery) and again.body == body
                await again.produce(out, b"out-" + body)
                await again.ack()
    assert [r.value for r in await read_topic(out)] == [b"out-a", b"out-b", b"out-c"]
