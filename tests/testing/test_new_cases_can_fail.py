"""The features-match and deferral cases catch a broker that is not what it declares."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from oncely.brokers.base import Broker, Capabilities
from oncely.brokers.memory import MemoryBroker
from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures

pytestmark = pytest.mark.anyio


class _Suite(BrokerConformance):
    """Not collected (no Test prefix): its cases are called directly below."""

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        raise NotImplementedError


class ClaimsDeferCounts(MemoryBroker):
    """Says a deferral counts as an attempt, but the memory broker keeps the attempt."""

    capabilities = dataclasses.replace(MemoryBroker.capabilities, defer_keeps_attempt=False)


async def opened(broker: Broker) -> Broker:
    await broker.connect()
    return broker


@pytest.mark.parametrize(
    ("features", "mismatch"),
    [
        (BrokerFeatures(extend=False), "features.extend=False"),
        (BrokerFeatures(dlq_admin=False), "features.dlq_admin=False"),
        (BrokerFeatures(defer_keeps_attempt=False), "features.defer_keeps_attempt=False"),
        (BrokerFeatures(reopen=False), "features.reopen must be true"),
    ],
)
async def test_a_features_record_that_contradicts_capabilities_fails(
    features: BrokerFeatures, mismatch: str
) -> None:
    class Suite(_Suite):
        pass

    Suite.features = features
    broker = await opened(MemoryBroker())
    # The memory broker is not durable; the reopen case needs a durable claim to contradict.
    if "reopen" in mismatch:
        caps: Capabilities = dataclasses.replace(broker.capabilities, durable=True)
        broker.capabilities = caps
    with pytest.raises(AssertionError, match=mismatch):
        await Suite().test_features_match_capabilities(broker)
    await broker.aclose()


async def test_the_matching_record_passes() -> None:
    broker = await opened(MemoryBroker())
    await _Suite().test_features_match_capabilities(broker)
    await broker.aclose()


async def test_a_deferral_that_does_not_do_what_capabilities_say_fails() -> None:
    class Suite(_Suite):
        features = BrokerFeatures(defer_keeps_attempt=False, latency=1.0)

    broker = await opened(ClaimsDeferCounts(f"h-{uuid.uuid4().hex}"))
    with pytest.raises(AssertionError, match=r"\[1, 1, 1, 2\] == \[1, 2, 3, 4\]"):
        await Suite().test_deferral_keeps_the_attempt_where_the_broker_can(
            broker, f"t-{uuid.uuid4().hex}"
        )
    await broker.aclose()
