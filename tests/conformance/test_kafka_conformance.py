"""The broker conformance suite over Apache Kafka (``ONCELY_TEST_KAFKA_URL``; never skipped).

What Kafka cannot do, declared rather than faked:

* no per-message visibility: an unsettled record is redelivered when its partition moves to
  another member (or the member restarts), not when ``visibility`` passes
  (``visibility_expiry=False``); ``extend`` keeps the partition owned (see
  ``oncely.brokers.kafka``), which the extend case checks with two more members joining;
* delays are retry-topic buckets (granularity up to 1 s);
* joining a consumer group takes a rebalance, so ``latency`` is generous.

Two cases assume per-message competition between consumers (RabbitMQ, SQS): a second
consumer of one topic taking messages a first one holds unsettled, or a closed consumer's
unsettled message letting later ones through. Kafka hands out partitions, and an unsettled
offset holds its partition's commit, so both are replaced below by the Kafka form of the same
guarantee (prefetch bounds what one member holds; a closing subscription keeps its yielded
deliveries valid and returns the rest).
"""

from __future__ import annotations

import time
import uuid

import anyio
import pytest

from oncely.brokers.base import Broker
from oncely.brokers.kafka import KafkaBroker
from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures
from tests.brokers.kafka_support import kafka_url
from tests.conftest import RUN_MARK

pytestmark = pytest.mark.kafka


class TestKafkaBroker(BrokerConformance):
    features = BrokerFeatures(
        visibility_expiry=False,
        lease_check=False,
        delay_granularity=1.0,
        latency=15.0,
        quiet_seconds=0.5,
        visibility_seconds=1.0,
        carries_errors=True,
    )

    def make_topic(self) -> str:
        # The run's mark, so the run deletes its topics at the end (tests/conftest.py).
        return f"{RUN_MARK}conformance-{uuid.uuid4().hex[:16]}"

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        url = kafka_url()

        async def make() -> Broker:
            broker = KafkaBroker.from_url(url)
            await broker.connect()
            return broker

        return make

    @pytest.mark.anyio
    async def test_prefetch_bounds_unsettled_deliveries(self, broker: Broker, topic: str) -> None:
        ids = await self._publish_many(broker, topic, 2)
        a = broker.consume(topic, prefetch=3, visibility=self._visibility())
        held = await self._take(a, 2)
        ids += await self._publish_many(broker, topic, 4)
        held.append(await self._next(a))
        await self._assert_quiet(a)  # full: a fourth must wait for a settle
        assert [d.id for d in held] == ids[:3]
        await held[0].ack()
        freed = await self._next(a)
        assert freed.id == ids[3], "a settle must free a prefetch slot"
        for d in (*held[1:], freed):
            await d.ack()
        rest = await self._take(a, 2)
        assert [d.id for d in rest] == ids[4:]
        for d in rest:
            await d.ack()
        await a.aclose()

    @pytest.mark.anyio
    async def test_subscription_aclose_returns_buffered_and_keeps_yielded(
        self, broker: Broker, topic: str
    ) -> None:
        ids = await self._publish_many(broker, topic, 5)
        sub = broker.consume(topic, prefetch=10, visibility=self._visibility())
        kept = await self._next(sub)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sub.aclose)
            await anyio.wait_all_tasks_blocked()
            start = time.monotonic()
            await kept.ack()  # still valid while the subscription closes
        assert time.monotonic() - start < self._visibility(), "aclose waited past the ack"
        await sub.aclose()
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()
        async with broker.consume(topic, prefetch=10, visibility=self._visibility()) as again:
            rest = await self._take(again, 4)
            for d in rest:
                assert d.id != kept.id
                await d.ack()
            await self._assert_quiet(again)
        assert {d.id for d in rest} | {kept.id} == set(ids)
