"""Spans of the paths the main tracing tests miss: a settle a shutdown cancel handed to a task
of its own, and a dead-letter reason that quotes the payload."""

from __future__ import annotations

from typing import Literal

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import oncely
from oncely.runtime._tracing import OUTCOME, SETTLE_FAILED
from tests._wait import eventually
from tests.runtime.test_logs_handoff import stopped_during_settle

pytestmark = pytest.mark.anyio

SECRET = "sk_live_4242_KIND"


class Order(msgspec.Struct):
    kind: Literal["card", "cash"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_handed_off_settle_ends_the_span_with_its_outcome(
    unique: str, spans: InMemorySpanExporter
) -> None:
    await stopped_during_settle(unique)
    process = [s for s in spans.get_finished_spans() if s.name == f"process {unique}"]
    assert len(process) == 1
    assert process[0].attributes is not None
    assert process[0].attributes.get(OUTCOME) == SETTLE_FAILED


async def test_a_dead_letter_reason_quoting_the_payload_stays_out_of_the_span(
    unique: str, spans: InMemorySpanExporter
) -> None:
    """Spans leave the process as logs do: an undecodable payload's reason goes on the span
    as the log line shows it, without the values msgspec quotes from the payload."""
    app = oncely.App()

    @app.handler(unique)
    async def handle(order: Order) -> None:
        return None

    broker = f"memory://{unique}"
    async with oncely.Worker(app, broker=broker) as worker:
        await app.publish(unique, {"kind": SECRET})
        await eventually(lambda: worker.stats.dead_lettered == 1)
    process = [s for s in spans.get_finished_spans() if s.name == f"process {unique}"]
    assert len(process) == 1
    span = process[0]
    assert span.attributes is not None
    assert "undecodable payload" in str(span.attributes.get("oncely.dead_letter_reason"))
    assert SECRET not in repr(dict(span.attributes))
    assert SECRET not in str(span.status.description)
