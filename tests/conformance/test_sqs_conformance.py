"""The broker conformance suite over SQS (ElasticMQ; ``ONCELY_TEST_SQS_URL``; never skipped),
on standard and FIFO queues.

SQS counts time in whole seconds (visibility and delays), so the short visibility and delays
are 1-2 s and round up. ElasticMQ refuses a stale receipt handle (``ReceiptHandleIsInvalid``),
so ``lease_check`` holds here; real SQS may accept one silently. FIFO queues have no
per-message publish delay, so the delay cases are off for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from oncely.brokers.sqs import SqsBroker
from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures
from tests.brokers.test_sqs import SQS_URL, delete_queues

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from oncely.brokers.base import Broker

pytestmark = pytest.mark.sqs

_FEATURES = {
    "delay_granularity": 1.0,
    "delay_seconds": 1.0,
    "visibility_seconds": 2.0,
    "long_visibility_seconds": 120.0,
    "latency": 6.0,
    "quiet_seconds": 0.5,
    # SQS counts every receive (ApproximateReceiveCount): a deferral is an attempt.
    "defer_keeps_attempt": False,
}


class TestSqsStandard(BrokerConformance):
    features = BrokerFeatures(**_FEATURES)  # type: ignore[arg-type]
    suffix = ""

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        async def make() -> Broker:
            broker = SqsBroker.from_url(SQS_URL)
            await broker.connect()
            return broker

        return make

    def make_topic(self) -> str:
        topic = super().make_topic() + self.suffix
        self.__dict__.setdefault("_topics", []).append(topic)
        return topic

    @pytest.fixture(autouse=True)
    async def _delete_queues(self, anyio_backend: object) -> AsyncIterator[None]:
        yield
        await delete_queues(self.__dict__.get("_topics", []))


class TestSqsFifo(TestSqsStandard):
    features = BrokerFeatures(**{**_FEATURES, "delay": False})  # type: ignore[arg-type]
    suffix = ".fifo"
