"""SQS adapter failure paths found in review, on ElasticMQ (``ONCELY_TEST_SQS_URL``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.sqs import SqsBroker
from oncely.errors import BrokerError, DeliveryExpired
from tests.brokers.test_sqs import SQS_URL, delete_queues, plain_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]


@pytest.fixture
async def topics() -> AsyncIterator[list[str]]:
    made: list[str] = []
    yield made
    await delete_queues(made)


@pytest.fixture
async def broker(topics: list[str]) -> AsyncIterator[SqsBroker]:
    async with SqsBroker.from_url(SQS_URL) as b:
        yield b


async def test_a_failed_ack_does_not_keep_its_prefetch_slot(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """An ack that fails with a broker error other than a stale handle (here: its queue was
    deleted under it) leaves the message to SQS; the subscription must not go on counting it
    against ``prefetch``, or a handful of such failures stalls consumption for good."""
    topics.append(unique)
    await broker.publish(unique, b"first")
    async with broker.consume(unique, prefetch=1, visibility=30) as sub:
        d = await asyncio.wait_for(anext(sub), 10)
        # prefetch=1 and one message out: no poll is in flight while the queue goes.
        url, _ = await broker.queue_urls(unique)
        async with plain_client() as client:
            await client.delete_queue(QueueUrl=url)
        with pytest.raises(BrokerError) as failed:
            await d.ack()
        assert not isinstance(failed.value, DeliveryExpired)
        mid = await broker.publish(unique, b"second")  # recreates the queue
        d2 = await asyncio.wait_for(anext(sub), 20)
        assert d2.id == mid
        await d2.ack()
