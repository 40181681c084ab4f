"""Traces on every broker, exported by the SDK's in-memory exporter: one trace from a publish,
through the handler's run and what it publishes, to the next handler's run; retries and
dead-letter replays stay in the trace."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import oncely
from oncely.brokers.base import DeadLetterAdmin, TransactionalDelivery
from oncely.brokers.kafka import KafkaBroker
from oncely.runtime import _keys
from oncely.stores.memory import MemoryStore
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url
from tests.tracing.conftest import topics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.anyio

FAST = oncely.RetryPolicy(max_attempts=5, base=0.05, cap=0.1)
SYSTEMS = {
    "memory": "memory",
    "sqlite": "sqlite",
    "amqp": "rabbitmq",
    "sqs": "aws_sqs",
    "kafka": "kafka",
}


def system_of(url: str) -> str:
    return SYSTEMS[url.split(":", 1)[0]]


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def one(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = named(spans, name)
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert child.context is not None and parent.context is not None
    assert child.context.trace_id == parent.context.trace_id
    assert parent_of(child) == parent.context.span_id, (child.name, parent.name)


async def test_one_trace_across_publish_consume_and_republish(
    spans: InMemorySpanExporter, broker_url: str, unique: str
) -> None:
    a, b, c = topics(unique)
    app = oncely.App(idempotent=True)
    done: list[str] = []

    @app.handler(a, name="first", retry=FAST)
    async def first(msg: dict[str, Any], ctx: oncely.Context) -> None:
        await ctx.publish(b, {"n": msg["n"]}, key=b)

    @app.handler(b, name="second", retry=FAST)
    async def second(msg: dict[str, Any], ctx: oncely.Context) -> None:
        await ctx.produce(c, {"n": msg["n"]}, key=c)

    @app.handler(c, name="third", retry=FAST)
    async def third(msg: dict[str, Any], ctx: oncely.Context) -> None:
        done.append(ctx.delivery.id)

    async with oncely.Worker(app, broker=broker_url, store=MemoryStore()):
        published = await app.publish(a, {"n": 1}, key=a)
        await eventually(lambda: len(done) == 1, within=60)
        await eventually(lambda: len(named(spans, f"process {c}")) == 1)

    send_a, process_a = one(spans, f"send {a}"), one(spans, f"process {a}")
    send_b, process_b = one(spans, f"send {b}"), one(spans, f"process {b}")
    send_c, process_c = one(spans, f"send {c}"), one(spans, f"process {c}")
    assert send_a.parent is None
    assert_child(process_a, send_a)
    assert_child(send_b, process_a)
    assert_child(process_b, send_b)
    assert_child(send_c, process_b)
    assert_child(process_c, send_c)

    system = system_of(broker_url)
    assert send_a.kind is SpanKind.PRODUCER and process_a.kind is SpanKind.CONSUMER
    assert process_a.instrumentation_scope is not None
    assert process_a.instrumentation_scope.name == "oncely"
    assert send_a.attributes is not None
    assert send_a.attributes["messaging.system"] == system
    assert send_a.attributes["messaging.message.id"] == published
    for span, topic, handler in ((process_a, a, "first"), (process_b, b, "second")):
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == system
        assert attributes["messaging.destination.name"] == topic
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["oncely.handler"] == handler
        assert attributes["oncely.idempotency_key"] == topic
        assert attributes["oncely.attempt"] == 1
        assert attributes["oncely.outcome"] == "acked"
        assert isinstance(attributes["messaging.message.id"], str)
        assert span.status.status_code is StatusCode.UNSET
    assert dict(process_c.attributes or {})["messaging.message.id"] == done[0]


async def test_a_retry_and_a_replayed_dead_letter_stay_in_the_trace(
    spans: InMemorySpanExporter, broker_url: str, unique: str
) -> None:
    a = topics(unique)[0]
    app = oncely.App(idempotent=True)
    runs: list[int] = []

    @app.handler(a, name="flaky", retry=FAST)
    async def flaky(msg: dict[str, Any], ctx: oncely.Context) -> None:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            raise RuntimeError("boom")
        if len(runs) == 2:
            raise oncely.Reject("not now")

    async with oncely.Worker(app, broker=broker_url, store=MemoryStore()) as worker:
        await app.publish(a, {"n": 1})
        await eventually(lambda: worker.stats.dead_lettered == 1, within=60)
        assert isinstance(worker.broker, DeadLetterAdmin)
        await eventually(lambda: len(named(spans, f"process {a}")) == 2)
        assert await worker.broker.replay(a) == 1
        await eventually(lambda: worker.stats.processed == 1, within=60)
        await eventually(lambda: len(named(spans, f"process {a}")) == 3)

    send = one(spans, f"send {a}")
    failed, rejected, replayed = sorted(
        named(spans, f"process {a}"), key=lambda s: s.start_time or 0
    )
    for span in (failed, rejected, replayed):
        assert_child(span, send)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "RuntimeError: boom"
    assert [e.name for e in failed.events] == ["exception"]
    assert dict(failed.events[0].attributes or {})["exception.message"] == "boom"
    assert dict(failed.attributes or {})["oncely.outcome"] == "retried"
    assert dict(failed.attributes or {})["oncely.attempt"] == 1
    assert rejected.status.status_code is StatusCode.ERROR
    assert dict(rejected.attributes or {})["oncely.outcome"] == "dead-lettered"
    assert dict(rejected.attributes or {})["oncely.dead_letter_reason"] == "not now"
    assert dict(rejected.attributes or {})["oncely.attempt"] == 2
    assert replayed.status.status_code is StatusCode.UNSET
    assert dict(replayed.attributes or {})["oncely.outcome"] == "acked"
    assert runs[:2] == [1, 2]


async def test_a_duplicate_short_circuit_is_a_span_with_its_outcome_and_event(
    spans: InMemorySpanExporter, unique: str
) -> None:
    app = oncely.App(idempotent=True)
    runs: list[str] = []

    @app.handler("orders", name="orders")
    async def handle(msg: dict[str, Any], ctx: oncely.Context) -> None:
        runs.append(ctx.delivery.id)

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("orders", {"n": 1}, key="k1")
        await eventually(lambda: worker.stats.processed == 1)
        await app.publish("orders", {"n": 1}, key="k1")
        await eventually(lambda: worker.stats.duplicates == 1)
        await eventually(lambda: len(named(spans, "process orders")) == 2)

    ran, duplicate = sorted(named(spans, "process orders"), key=lambda s: s.start_time or 0)
    first_send, second_send = sorted(named(spans, "send orders"), key=lambda s: s.start_time or 0)
    assert_child(ran, first_send)
    assert_child(duplicate, second_send)
    assert dict(ran.attributes or {})["oncely.outcome"] == "acked"
    assert [e.name for e in ran.events] == []
    assert dict(duplicate.attributes or {})["oncely.outcome"] == "duplicate"
    assert dict(duplicate.attributes or {})["oncely.idempotency_key"] == "k1"
    assert [e.name for e in duplicate.events] == ["oncely.duplicate"]
    assert duplicate.status.status_code is StatusCode.UNSET
    assert len(runs) == 1


@pytest.mark.kafka
async def test_ctx_produce_in_a_kafka_transaction_joins_the_trace(
    spans: InMemorySpanExporter, unique: str
) -> None:
    """On an exactly-once Kafka subscription ``ctx.produce`` goes through the delivery's
    transaction (``TransactionalDelivery.produce``), not the publisher."""
    a, b, _ = topics(unique)
    app = oncely.App()
    done: list[str] = []

    @app.handler(a, name="copy")
    async def copy(msg: dict[str, Any], ctx: oncely.Context) -> None:
        assert isinstance(ctx.delivery, TransactionalDelivery)
        await ctx.produce(b, msg, key="k")

    @app.handler(b, name="sink")
    async def sink(msg: dict[str, Any], ctx: oncely.Context) -> None:
        done.append(ctx.delivery.id)

    async with KafkaBroker.from_url(kafka_url(exactly_once=a)) as broker:
        await broker.ensure_topics([a, b])
        async with oncely.Worker(app, broker=broker):
            await app.publish(a, {"n": 1}, key="k")
            await eventually(lambda: len(done) == 1, within=60)
            await eventually(lambda: len(named(spans, f"process {b}")) == 1)

    send_a, process_a = one(spans, f"send {a}"), one(spans, f"process {a}")
    send_b, process_b = one(spans, f"send {b}"), one(spans, f"process {b}")
    assert_child(process_a, send_a)
    assert_child(send_b, process_a)
    assert_child(process_b, send_b)
    assert dict(send_b.attributes or {})["messaging.system"] == "kafka"
    assert dict(process_a.attributes or {})["oncely.outcome"] == "acked"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


async def test_an_exception_tracing_cannot_print_changes_nothing_about_the_message(
    spans: InMemorySpanExporter, unique: str
) -> None:
    app = oncely.App()
    runs: list[int] = []

    @app.handler("jobs", name="jobs", retry=FAST)
    async def handle(msg: dict[str, Any], ctx: oncely.Context) -> None:
        runs.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Unprintable

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("jobs", {"n": 1})
        await eventually(lambda: worker.stats.processed == 1)
        await eventually(lambda: len(named(spans, "process jobs")) == 2)
    assert runs == [1, 2]
    assert worker.stats.internal_errors == 0
    failed, ok = sorted(named(spans, "process jobs"), key=lambda s: s.start_time or 0)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "Unprintable: <unprintable>"
    assert dict(failed.attributes or {})["oncely.outcome"] == "retried"
    assert dict(ok.attributes or {})["oncely.outcome"] == "acked"


async def test_a_key_held_by_another_run_is_a_deferred_span(
    spans: InMemorySpanExporter, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The duplicate defers once its in-process wait for the holder gives up: after 5 s by
    # default, which was nearly all of this test.
    monkeypatch.setattr(_keys, "LOCAL_WAIT_CAP", 0.2)
    app = oncely.App(idempotent=True)
    release = asyncio.Event()
    runs: list[int] = []

    @app.handler("orders", name="orders", concurrency=2)
    async def handle(msg: dict[str, Any]) -> None:
        runs.append(msg["n"])
        await release.wait()

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("orders", {"n": 1}, key="held")
        await eventually(lambda: runs == [1])
        # The same message again while the first run holds its key: deferred, not run.
        await app.publish("orders", {"n": 1}, key="held")
        await eventually(lambda: worker.stats.deferred >= 1)
        release.set()
        await eventually(lambda: worker.stats.processed + worker.stats.duplicates == 2)
        await eventually(lambda: len(named(spans, "process orders")) == worker.stats.deferred + 2)
    outcomes = {
        str(dict(s.attributes or {})["oncely.outcome"]) for s in named(spans, "process orders")
    }
    assert outcomes == {"acked", "deferred", "duplicate"}
    deferred = [
        s
        for s in named(spans, "process orders")
        if dict(s.attributes or {})["oncely.outcome"] == "deferred"
    ]
    assert all(s.status.status_code is StatusCode.UNSET for s in deferred)
    assert all(dict(s.attributes or {})["oncely.idempotency_key"] == "held" for s in deferred)
    assert runs == [1]


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "",
        "00-00000000000000000000000000000000-0000000000000000-01",  # all-zero ids: invalid
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff: invalid
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case: invalid
        "00-" + "a" * 10_000,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace_and_changes_nothing_else(
    spans: InMemorySpanExporter, unique: str, traceparent: str
) -> None:
    app = oncely.App()
    seen: list[str] = []

    @app.handler("jobs", name="jobs")
    async def handle(msg: dict[str, Any], ctx: oncely.Context) -> None:
        seen.append(ctx.delivery.id)

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        assert worker.broker is not None
        # Straight to the broker: a publisher would write a valid traceparent.
        await worker.broker.publish("jobs", b"{}", headers={"traceparent": traceparent})
        await eventually(lambda: len(named(spans, "process jobs")) == 1)
    (span,) = named(spans, "process jobs")
    assert span.parent is None
    assert dict(span.attributes or {})["oncely.outcome"] == "acked"
    assert len(seen) == 1


class Unwind(BaseException):
    """A library's own unwinding signal, not an ``Exception``."""


async def test_a_base_exception_from_a_handler_is_traced_as_itself(
    spans: InMemorySpanExporter, unique: str
) -> None:
    app = oncely.App()

    @app.handler("jobs", name="jobs", retry=FAST)
    async def handle(msg: dict[str, Any], ctx: oncely.Context) -> None:
        if ctx.attempt == 1:
            raise Unwind("unwinding")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("jobs", {"n": 1})
        await eventually(lambda: worker.stats.processed == 1)
        await eventually(lambda: len(named(spans, "process jobs")) == 2)
    failed, _ = sorted(named(spans, "process jobs"), key=lambda s: s.start_time or 0)
    # Not the runtime's wrapper (Escaped) it is settled through.
    assert failed.status.description == "Unwind: unwinding"
    assert str(dict(failed.events[0].attributes or {})["exception.type"]).endswith("Unwind")
