"""Spans of the paths the main tracing tests miss: a settle a shutdown cancel handed to a task
of its own, and a dead-letter reason that quotes the payload."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import msgspec
import pytest
from opentelemetry import propagate
from opentelemetry.propagators.textmap import TextMapPropagator
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


class BrokenPropagator(TextMapPropagator):
    """An application's propagator with a bug: every call raises."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        raise RuntimeError("propagator bug")

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        raise RuntimeError("propagator bug")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


async def test_a_failing_propagator_changes_nothing_about_publish_and_handling(
    unique: str, spans: InMemorySpanExporter
) -> None:
    app = oncely.App()
    got: list[dict[str, int]] = []

    @app.handler(unique)
    async def handle(payload: dict[str, int], ctx: oncely.Context) -> None:
        got.append(payload)
        if payload["n"] == 1:
            await ctx.publish(unique, {"n": 2})

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(BrokenPropagator())
    try:
        async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
            await app.publish(unique, {"n": 1})
            await eventually(lambda: worker.stats.processed == 2)
    finally:
        propagate.set_global_textmap(previous)
    assert got == [{"n": 1}, {"n": 2}]
    names = sorted(s.name for s in spans.get_finished_spans())
    assert names.count(f"send {unique}") == 2  # the spans still ended


async def test_a_traced_run_leaves_the_context_as_it_found_it_so_the_task_is_reused(
    unique: str, spans: InMemorySpanExporter
) -> None:
    """The pool ends a task whose context variables a run changed: a traced run must detach
    what it attached, or tracing would cost a task per message."""
    app = oncely.App()
    tasks: list[object] = []

    @app.handler(unique, concurrency=1)
    async def handle(payload: dict[str, int]) -> None:
        tasks.append(asyncio.current_task())

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for n in range(3):
            await app.publish(unique, {"n": n})
            await eventually(lambda n=n: worker.stats.processed == n + 1)  # type: ignore[misc]
    assert len(tasks) == 3 and len(set(map(id, tasks))) == 1
    assert len([s for s in spans.get_finished_spans() if s.name == f"process {unique}"]) == 3
