"""Traces through the transactional outbox, on a real PostgreSQL and on SQLite: the row
carries the trace context of its ``add``, the relay's publish is a span in that trace, and the
consumer's span joins the trace the application's transaction ran in."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import oncely
from oncely.brokers.memory import MemoryBroker
from oncely.stores.memory import MemoryStore
from oncely.stores.outbox import OutboxRelay
from tests._wait import eventually
from tests.stores._outbox_support import RefusingBroker, UserDb, db
from tests.tracing.test_traces import assert_child, named, one

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["db"]  # the fixture, used by name

pytestmark = pytest.mark.anyio


async def test_add_relay_consume_republish_is_one_trace(
    spans: InMemorySpanExporter, db: UserDb, unique: str
) -> None:
    outbox = db.outbox
    broker = f"memory://{unique}"
    app = oncely.App(idempotent=True)
    done: list[str] = []

    @app.handler("orders.placed", name="placed")
    async def placed(order: dict[str, Any], ctx: oncely.Context) -> None:
        await ctx.publish("orders.billed", order, key=order["id"])

    @app.handler("orders.billed", name="billed")
    async def billed(order: dict[str, Any]) -> None:
        done.append(order["id"])

    with trace.get_tracer("checkout").start_as_current_span("checkout") as checkout:
        async with db.transaction() as conn:
            await db.insert_biz(conn, "o1")
            message_id = await outbox.add(
                conn, "orders.placed", {"id": "o1"}, key="o1", headers={"tenant": "t1"}
            )
    (stored,) = await db.fetch(f"SELECT headers FROM {outbox.table}")
    row_headers = stored[0] if isinstance(stored[0], dict) else json.loads(stored[0])
    assert row_headers["tenant"] == "t1"
    assert (
        row_headers["traceparent"].split("-")[1] == f"{checkout.get_span_context().trace_id:032x}"
    )

    async with (
        OutboxRelay(outbox, broker, poll=0.05),
        oncely.Worker(app, broker=broker, store=MemoryStore()),
    ):
        await eventually(lambda: done == ["o1"], within=30)
        await eventually(lambda: len(named(spans, "process orders.billed")) == 1)

    root = one(spans, "checkout")
    create = one(spans, "create orders.placed")
    relayed = one(spans, "send orders.placed")
    process = one(spans, "process orders.placed")
    send = one(spans, "send orders.billed")
    process_billed = one(spans, "process orders.billed")
    assert_child(create, root)
    assert_child(relayed, create)
    assert_child(process, relayed)
    assert_child(send, process)
    assert_child(process_billed, send)
    assert create.kind is SpanKind.PRODUCER
    created = dict(create.attributes or {})
    assert created["messaging.message.id"] == message_id
    assert created["messaging.operation.type"] == "create"
    assert created["oncely.outbox"] == outbox.dialect
    assert relayed.kind is SpanKind.PRODUCER
    sent = dict(relayed.attributes or {})
    assert sent["messaging.message.id"] == message_id
    assert sent["messaging.system"] == "memory"
    consumed = dict(process.attributes or {})
    assert consumed["messaging.message.id"] == message_id
    assert consumed["oncely.idempotency_key"] == message_id  # the row's oncely-dedupe-key
    assert consumed["oncely.outcome"] == "acked"


async def test_a_refused_relay_publish_is_an_error_span_and_its_retry_another(
    spans: InMemorySpanExporter, db: UserDb, unique: str
) -> None:
    broker = RefusingBroker(MemoryBroker.from_url(f"memory://{unique}"), refuse={"orders"})
    async with db.transaction() as conn:
        message_id = await db.outbox.add(conn, "orders", {"id": "o1"})
    relay = OutboxRelay(db.outbox, broker, poll=0.05, retry_base=0.05, retry_cap=0.1)
    async with broker, relay:
        await eventually(lambda: broker.refused >= 1)
        broker.refuse.clear()
        await eventually(lambda: relay.stats.published == 1)

    create = one(spans, "create orders")
    sends = named(spans, "send orders")
    refused = [s for s in sends if s.status.status_code is StatusCode.ERROR]
    (delivered,) = [s for s in sends if s.status.status_code is StatusCode.UNSET]
    assert len(refused) == broker.refused
    for span in sends:
        assert_child(span, create)
        assert dict(span.attributes or {})["messaging.message.id"] == message_id
    assert refused[0].status.description == "PublishFailed: refused by the test: orders"
    assert [e.name for e in refused[0].events] == ["exception"]
    assert delivered.end_time is not None and refused[-1].end_time is not None
    assert delivered.end_time > refused[-1].end_time
