"""The conformance kit's default timings leave a loaded CI machine room: a stall of the test
process shorter than a second is not taken for a lapsed visibility."""

from __future__ import annotations

import time
import uuid

import pytest

from oncely.brokers.base import Broker
from oncely.brokers.memory import MemoryBroker, _MemoryDelivery
from oncely.testing import BrokerConformance, BrokerFactory

pytestmark = pytest.mark.anyio

STALL = 0.45
"""Seconds the test process stands still, as a busy 2-core machine can make it."""


class _Suite(BrokerConformance):
    """Not collected (no Test prefix): its case is called directly below, with the default
    ``BrokerFeatures``."""

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        raise NotImplementedError


async def test_the_extend_case_outlasts_a_stall_of_the_test_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_extend = _MemoryDelivery.extend
    stalls = 0

    async def extend_then_stall(self: _MemoryDelivery, seconds: float) -> None:
        nonlocal stalls
        await real_extend(self, seconds)
        if not stalls:
            stalls += 1
            time.sleep(STALL)  # noqa: ASYNC251 - the stall is the subject: the loop stands still

    monkeypatch.setattr(_MemoryDelivery, "extend", extend_then_stall)
    hub = f"stall-{uuid.uuid4().hex}"
    opened: list[Broker] = []

    async def open_broker() -> Broker:
        broker = MemoryBroker.from_url(f"memory://{hub}")
        await broker.connect()
        opened.append(broker)
        return broker

    try:
        suite = _Suite()
        await suite.test_extend_keeps_message_invisible(await open_broker(), open_broker, "t")
    finally:
        for broker in opened:
            await broker.aclose()
    assert stalls == 1
