"""The runtime conformance suite over RabbitMQ (``ONCELY_TEST_AMQP_URL``; never skipped).

The fuzz case publishes 2,000 bodies, the 5 MB one included. The clamp case runs against the
adapter's real ``max_delay`` (1 hour).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from oncely.brokers.amqp import AmqpBroker
from oncely.testing import BrokerFactory, RuntimeConformance, RuntimeFeatures
from tests.brokers.test_amqp import AMQP_URL, delete_topology

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from oncely.brokers.base import Broker

pytestmark = pytest.mark.amqp


class TestAmqpRuntime(RuntimeConformance):
    features = RuntimeFeatures(fuzz_bodies=2000, latency=5.0)

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
