"""Review of the exactly-once burst send (``_kafka_burst``): an output batch the broker refuses
must fail its transaction, never commit the input offset without it. Real Kafka."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers._kafka_options import dlq_topic
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import DeliveryExpired
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url, read_topic
from tests.brokers.test_kafka import committed_offsets

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _create_small_topic(topic: str, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()  # type: ignore[no-untyped-call]
    try:
        config = {"max.message.bytes": str(max_message_bytes)}
        new = NewTopic(topic, 1, 1, topic_configs=config)  # type: ignore[no-untyped-call]
        await admin.create_topics([new])
    finally:
        await admin.close()  # type: ignore[no-untyped-call]


async def test_an_output_batch_the_broker_refuses_fails_the_transaction(unique: str) -> None:
    """The output topic takes batches of at most 1 KB; the handler's 4 KB output passes the
    client's own size check (1 MB) but the broker refuses it. Before, nobody looked at the
    batch's outcome and the transaction committed the input offset without the output: the
    record was lost. Now the commit fails, the ack says so, and the offset stays put."""
    group, out = f"g-{unique}", f"{unique}-out"
    await _create_small_topic(out, 1024)
    url = kafka_url(group, exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"in")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            await delivery.produce(out, b"x" * 4096)
            with pytest.raises(DeliveryExpired, match="failed"):
                await delivery.ack()
            # The partition starts over from the committed offset: the record runs again.
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert again.id == delivery.id
            assert await committed_offsets(group, unique) in ({}, {0: 0})
            await again.reject("output too large")  # its way out: the dead-letter topic
    assert await read_topic(out) == []
    assert [r.value for r in await read_topic(dlq_topic(unique))] == [b"in"]
    assert await committed_offsets(group, unique) == {0: 1}
