"""A record the broker refuses for good must not break the publishes after it. Real Kafka.

The idempotent producer numbers each partition's batches; a refused batch spent numbers the
broker never wrote, so it answered every later batch of that partition with
OutOfOrderSequenceNumber, and aiokafka does not recover from that on its own: one record over
a topic's ``max.message.bytes`` failed every later publish to the partition until the process
restarted. The broker now restarts its producer after such a refusal.
"""

from __future__ import annotations

import pytest

from oncely.brokers.kafka import KafkaBroker
from oncely.errors import PublishFailed
from tests.brokers.kafka_support import create_small_topic, kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_publishes_after_a_refused_record_go_through(unique: str) -> None:
    await create_small_topic(unique, 2000)
    async with KafkaBroker.from_url(kafka_url()) as broker:
        await broker.publish(unique, b"first")  # the partition's sequence numbers start
        with pytest.raises(PublishFailed, match="MessageSizeTooLarge"):
            await broker.publish(unique, b"x" * 5000)
        for body in (b"second", b"third"):
            await broker.publish(unique, body)
    assert [r.value for r in await read_topic(unique)] == [b"first", b"second", b"third"]
