"""Fixtures of the tracing tests: a global tracer provider exporting to memory, for one test.

OpenTelemetry lets a process set its tracer provider once; the fixture puts the API's globals
back afterwards (as OpenTelemetry's own test helpers do), so tracing is off again for every
other test in the session (a ``traceparent`` header would change their header budgets).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from tests.brokers.kafka_support import kafka_url
from tests.brokers.test_amqp import AMQP_URL, delete_topology
from tests.brokers.test_sqs import SQS_URL, delete_queues


def reset_trace_globals() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace._PROXY_TRACER_PROVIDER = trace.ProxyTracerProvider()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test; the exporter holds every span ended."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reset_trace_globals()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        reset_trace_globals()


BROKERS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("amqp", marks=pytest.mark.amqp),
    pytest.param("sqs", marks=pytest.mark.sqs),
    pytest.param("kafka", marks=pytest.mark.kafka),
]


@pytest.fixture(params=BROKERS)
async def broker_url(
    request: pytest.FixtureRequest, unique: str, tmp_path: Path, anyio_backend: object
) -> AsyncIterator[str]:
    """A URL of each broker (the shared test servers), and clean-up of the test's topics
    ``<unique>-*`` (see ``topics``)."""
    kind: str = request.param
    if kind == "memory":
        yield f"memory://{unique}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}?poll_interval=0.05"
    elif kind == "amqp":
        yield AMQP_URL
        for topic in topics(unique):
            await delete_topology(topic)
    elif kind == "sqs":
        yield SQS_URL
        await delete_queues(topics(unique))
    else:
        yield kafka_url()


def topics(unique: str) -> list[str]:
    """The topics a test may use (three: ``<unique>-a``, ``-b``, ``-c``)."""
    return [f"{unique}-{x}" for x in "abc"]
