"""The runtime conformance suite over Apache Kafka (``ONCELY_TEST_KAFKA_URL``; never skipped).

Each test gets its own consumer group (``kafka_url``). Kafka keeps no delivery count, but
``oncely-attempt`` travels in a header and ``nack(defer=True)`` keeps it, so deferrals keep the
attempt here too. Kafka refuses records over its request size (about 1 MB by default), so the
fuzz case leaves out its 5 MB body; ``test_an_oversized_body_is_refused_not_truncated`` checks
that such a publish fails loudly instead.
"""

from __future__ import annotations

import uuid

import pytest

from oncely.brokers.base import Broker
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import PublishFailed
from oncely.testing import BrokerFactory, RuntimeConformance, RuntimeFeatures
from tests.brokers.kafka_support import kafka_url
from tests.conftest import RUN_MARK

pytestmark = pytest.mark.kafka


class TestKafkaRuntime(RuntimeConformance):
    features = RuntimeFeatures(fuzz_bodies=2000, big_body=False, latency=15.0)

    def make_topic(self) -> str:
        # The run's mark, so the run deletes its topics at the end (tests/conftest.py).
        return f"{RUN_MARK}runtime-{uuid.uuid4().hex[:16]}"

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        url = kafka_url()

        async def make() -> Broker:
            broker = KafkaBroker.from_url(url)
            await broker.connect()
            return broker

        return make


@pytest.mark.anyio
async def test_an_oversized_body_is_refused_not_truncated() -> None:
    async with KafkaBroker.from_url(kafka_url()) as broker:
        with pytest.raises(PublishFailed, match="larger than the maximum"):
            await broker.publish(f"big-{uuid.uuid4().hex[:10]}", b"x" * 5_000_000)
