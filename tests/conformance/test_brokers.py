"""The broker conformance suite (``oncely.testing``) over every embedded broker."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures

if TYPE_CHECKING:
    from pathlib import Path

    from oncely.brokers.base import Broker


class TestMemoryBroker(BrokerConformance):
    features = BrokerFeatures(latency=1.0, carries_errors=True)

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        # A named hub per test: reopening on the same name finds the same messages.
        hub = f"conformance-{uuid.uuid4().hex}"

        async def make() -> Broker:
            broker = MemoryBroker.from_url(f"memory://{hub}")
            await broker.connect()
            return broker

        return make


class TestSqliteBroker(BrokerConformance):
    features = BrokerFeatures(latency=2.0, carries_errors=True)

    @pytest.fixture
    def broker_factory(self, tmp_path: Path) -> BrokerFactory:
        url = f"sqlite:///{tmp_path / 'queue.db'}?poll_interval=0.02"

        async def make() -> Broker:
            broker = SqliteBroker.from_url(url)
            await broker.connect()
            return broker

        return make
