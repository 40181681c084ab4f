"""The runtime conformance suite (``oncely.testing.RuntimeConformance``) over every embedded
broker."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.testing import BrokerFactory, RuntimeConformance, RuntimeFeatures

if TYPE_CHECKING:
    from pathlib import Path

    from oncely.brokers.base import Broker


class TestMemoryRuntime(RuntimeConformance):
    features = RuntimeFeatures(fuzz_bodies=3000, latency=2.0)

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        hub = f"runtime-{uuid.uuid4().hex}"

        async def make() -> Broker:
            broker = MemoryBroker.from_url(f"memory://{hub}")
            await broker.connect()
            return broker

        return make


class TestSqliteRuntime(RuntimeConformance):
    features = RuntimeFeatures(fuzz_bodies=2000, latency=3.0)

    @pytest.fixture
    def broker_factory(self, tmp_path: Path) -> BrokerFactory:
        url = f"sqlite:///{tmp_path / 'queue.db'}?poll_interval=0.02"

        async def make() -> Broker:
            broker = SqliteBroker.from_url(url)
            await broker.connect()
            return broker

        return make
