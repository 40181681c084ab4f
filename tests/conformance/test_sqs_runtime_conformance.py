"""The runtime conformance suite over SQS (ElasticMQ; ``ONCELY_TEST_SQS_URL``; never skipped).

SQS caps a message at 256 KiB by default, so the fuzz case leaves out its 5 MB body (an
oversized publish raising ``PublishFailed`` is tested in ``tests/brokers/test_sqs.py``).
``ApproximateReceiveCount`` belongs to the broker, so deferrals count as attempts here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from oncely.brokers.sqs import SqsBroker
from oncely.testing import BrokerFactory, RuntimeConformance, RuntimeFeatures
from tests.brokers.test_sqs import SQS_URL, delete_queues

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from oncely.brokers.base import Broker

pytestmark = pytest.mark.sqs


class TestSqsRuntime(RuntimeConformance):
    features = RuntimeFeatures(
        fuzz_bodies=1500, big_body=False, defer_keeps_attempt=False, latency=6.0
    )

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        async def make() -> Broker:
            broker = SqsBroker.from_url(SQS_URL)
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
        await delete_queues(self.__dict__.get("_topics", []))
