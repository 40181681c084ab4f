"""The runtime conformance suite with tracing on (memory and SQLite): spans must change
nothing about what happens to a message, fuzzed bodies and hostile headers included."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.testing import BrokerFactory, RuntimeConformance, RuntimeFeatures

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from oncely.brokers.base import Broker


class Traced(RuntimeConformance):
    @pytest.fixture(autouse=True)
    def _traced(self, spans: InMemorySpanExporter) -> None:
        self.spans = spans

    @pytest.fixture(autouse=True)
    def _spans_were_made(self, _traced: None) -> Iterator[None]:
        yield
        # Every case runs handlers, so an empty exporter would mean tracing was off.
        assert any(s.name.startswith("process ") for s in self.spans.get_finished_spans())


class TestTracedMemoryRuntime(Traced):
    features = RuntimeFeatures(fuzz_bodies=1000, latency=2.0)

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        hub = f"traced-{uuid.uuid4().hex}"

        async def make() -> Broker:
            broker = MemoryBroker.from_url(f"memory://{hub}")
            await broker.connect()
            return broker

        return make


class TestTracedSqliteRuntime(Traced):
    features = RuntimeFeatures(fuzz_bodies=500, latency=3.0)

    @pytest.fixture
    def broker_factory(self, tmp_path: Path) -> BrokerFactory:
        url = f"sqlite:///{tmp_path / 'queue.db'}?poll_interval=0.02"

        async def make() -> Broker:
            broker = SqliteBroker.from_url(url)
            await broker.connect()
            return broker

        return make
