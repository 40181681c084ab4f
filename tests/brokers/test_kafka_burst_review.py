"""Review of the exactly-once burst send (``_kafka_burst``): an output batch the broker refuses
must fail its transaction, never commit the input offset without it. Real Kafka."""

from __future__ import annotations

import asyncio

import pytest

import oncely
from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers._kafka_options import dlq_topic
from oncely.brokers.base import Headers
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import DeliveryExpired
from tests._wait import eventually
from tests.brokers.kafka_support import create_small_topic, kafka_url, read_topic
from tests.brokers.test_kafka import committed_offsets
from tests.brokers.test_kafka_eos import eventually_offsets_within

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_output_batch_the_broker_refuses_fails_the_transaction(unique: str) -> None:
    """The output topic takes batches of at most 1 KB; the handler's 4 KB output passes the
    client's own size check (1 MB) but the broker refuses it. Before, nobody looked at the
    batch's outcome and the transaction committed the input offset without the output: the
    record was lost. Now the commit fails, the ack says so, and the offset stays put."""
    group, out = f"g-{unique}", f"{unique}-out"
    await create_small_topic(out, 1024)
    url = kafka_url(group, exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"in")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            await delivery.produce(out, b"x" * 4096)
            with pytest.raises(DeliveryExpired, match="failed"):
                await delivery.ack()
            # The partition starts over from the committed offset: the record runs again.
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert again.id == delivery.id
            assert await committed_offsets(group, unique) in ({}, {0: 0})
            await again.reject("output too large")  # its way out: the dead-letter topic
    assert await read_topic(out) == []
    assert [r.value for r in await read_topic(dlq_topic(unique))] == [b"in"]
    # Committed in the reject's transaction: Kafka answers the commit before its markers
    # reach the group's offsets, and until they do the group still reads the previous one.
    await eventually_offsets_within(group, unique, {0: 1}, 30)


async def test_an_output_too_large_to_ever_send_fails_the_handler_and_dead_letters(
    unique: str,
) -> None:
    """An output over the producer's max_request_size can never be sent. Refused at commit
    time, it failed the transaction and the record replayed with the same attempt for ever,
    holding its partition. Refused when the handler produces it, it is the handler's failure:
    retried, then dead-lettered with the reason, while the other records are copied."""
    src, out = unique, f"{unique}-out"
    app = oncely.App()

    @app.handler(src, retry=oncely.RetryPolicy(max_attempts=2, base=0.01, cap=0.01))
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        value = b"x" * 2_000_000 if body == b"big" else body
        await ctx.produce(out, value, key=ctx.headers.get("oncely-key"))

    group = f"g-{unique}"
    async with KafkaBroker.from_url(kafka_url(group, exactly_once=src)) as broker:
        await broker.ensure_topics([out])
        for body in (b"a", b"big", b"b"):
            await broker.publish(src, body, headers={"oncely-key": "k"})
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(
                lambda: worker.stats.dead_lettered == 1 and worker.stats.processed == 2, 60
            )
    assert [r.value for r in await read_topic(out)] == [b"a", b"b"]
    [dead] = await read_topic(dlq_topic(src))
    assert dead.value == b"big"
    reason = dict(dead.headers)[Headers.REASON].decode()
    assert "max_request_size" in reason and "gave up after 2 attempts" in reason, reason
