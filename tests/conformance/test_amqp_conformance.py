"""The broker conformance suite over RabbitMQ (``ONCELY_TEST_AMQP_URL``; never skipped).

AMQP cannot extend one delivery or expire it by ``visibility`` (only the broker-wide
``consumer_timeout`` reclaims a delivery, by closing its channel), so those cases are off.
Delays are rounded up to TTL buckets of at least 1 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from oncely.brokers.amqp import AmqpBroker
from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures
from tests.brokers.test_amqp import AMQP_URL, delete_topology

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from oncely.brokers.base import Broker

pytestmark = pytest.mark.amqp


class TestAmqpBroker(BrokerConformance):
    features = BrokerFeatures(
        extend=False,
        visibility_expiry=False,
        lease_check=False,
        delay_granularity=1.0,
        latency=5.0,
        carries_errors=True,
    )

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        async def make() -> Broker:
            broker = AmqpBroker.from_url(AMQP_URL)
            await broker.connect()
            return broker

        return make

    def make_topic(self) -> str:
        topic = super().make_topic()
        self.__dict__.setdefault("_topics", []).append(topic)
        return topic

    @pytest.fixture(autouse=True)
    async def _delete_queues(self, anyio_backend: object) -> AsyncIterator[None]:
        yield
        for topic in self.__dict__.get("_topics", []):
            await delete_topology(topic)
