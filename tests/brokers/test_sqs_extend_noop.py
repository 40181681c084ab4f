"""``Stats.extensions`` counts the visibility extensions made: an SQS ``extend`` that is a
no-op (an ack or nack on its way, the 12-hour cap reached) says so and is not counted."""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers.sqs import SqsBroker
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from tests.brokers.test_sqs import SQS_URL, topics

pytestmark = [pytest.mark.anyio, pytest.mark.sqs]

__all__ = ["topics"]  # the fixture, used by name


async def test_an_extend_while_the_ack_is_on_its_way_is_not_counted(
    unique: str, topics: list[str]
) -> None:
    topics.append(unique)
    # Each ack waits up to 1 s for others to share its DeleteMessageBatch: on its way meanwhile.
    async with SqsBroker.from_url(SQS_URL + "&ack_window=1") as broker:
        await broker.publish(unique, b"{}")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await anext(sub)
            stats = Stats()
            heartbeat = Heartbeat("h", 30, extend=True, store=None, stats=stats)
            active = Active(delivery, None)
            await heartbeat._beat(active)  # one beat of the heartbeat's loop
            assert stats.extensions == 1  # a real ChangeMessageVisibility
            acking = asyncio.create_task(delivery.ack())
            await asyncio.sleep(0)  # one loop pass: the ack's first step queues the delete
            await heartbeat._beat(active)
            # Before, every beat counted, the no-ops too.
            assert stats.extensions == 1, stats
            assert await delivery.extend(30) is False
            await acking
            await heartbeat.aclose()
    assert stats.heartbeat_errors == 0
