"""Exactly-once outputs go out as record batches (``_kafka_burst``): each keyed output lands in
the partition a plain send of its key picks, and a partition's outputs keep their order across
the several batches a large transaction needs. Real Kafka."""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers._kafka_burst import KeyHashes
from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers.kafka import KafkaBroker
from tests.brokers.kafka_support import kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _produce_from_one_record(
    url: str, topic: str, out: str, outputs: list[tuple[bytes, str | None]]
) -> None:
    """Consume one record exactly-once and produce ``outputs`` (body, key) in its transaction."""
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(topic, b"in")
        async with broker.consume(topic, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            for body, key in outputs:
                await delivery.produce(out, body, headers={"oncely-key": key} if key else None)
            await delivery.ack()  # the transaction commits at the latest when this closes


async def test_keyed_outputs_land_where_a_plain_send_of_the_key_does(unique: str) -> None:
    out, ref = f"{unique}-out", f"{unique}-ref"
    keys = [f"key-{i}" for i in range(64)]
    outputs: list[tuple[bytes, str | None]] = [(k.encode(), k) for k in keys]
    outputs += [(b"no-key-%d" % i, None) for i in range(8)]
    url = kafka_url(exactly_once=unique, partitions=4)
    await _produce_from_one_record(url, unique, out, outputs)
    async with KafkaBroker.from_url(kafka_url(partitions=4)) as broker:
        await broker.ensure_topics([ref])
        for key in keys:  # the idempotent producer's send(), partitioned by aiokafka
            await broker.send(ref, b"", key=key.encode(), headers={})
    sent = {r.key.decode(): r.partition for r in await read_topic(ref)}
    got = await read_topic(out)
    assert sorted(r.value for r in got) == sorted(body for body, _ in outputs)
    assert {r.key.decode(): r.partition for r in got if r.key is not None} == sent
    assert len(set(sent.values())) > 1  # the keys do spread over the partitions


async def test_a_partitions_outputs_keep_their_order_across_many_batches(unique: str) -> None:
    """400 KB for one partition in one transaction: about 25 batches of aiokafka's 16 KB."""
    out = f"{unique}-out"
    outputs: list[tuple[bytes, str | None]] = [
        (b"%04d-" % i + b"x" * 2000, "same") for i in range(200)
    ]
    await _produce_from_one_record(kafka_url(exactly_once=unique), unique, out, outputs)
    got = [r.value for r in await read_topic(out)]
    assert got == [body for body, _ in outputs]


def test_key_hashes_are_bounded_and_stable() -> None:
    hashes = KeyHashes(limit=4)
    first = [hashes.of(b"k%d" % i) for i in range(10)]  # over the limit: the memo restarts
    assert [hashes.of(b"k%d" % i) for i in range(10)] == first
    assert len(hashes.known) <= 4
    assert all(0 <= h <= 0x7FFFFFFF for h in first)


async def test_an_outputs_headers_key_and_id_go_out_as_given(unique: str) -> None:
    """A handler's headers travel UTF-8 encoded, its key becomes the record key, and the id
    is the deterministic ``<delivery id>/<n>`` unless one is given; headers that are not
    ``str`` to ``str`` fail the produce and buffer nothing."""
    out = f"{unique}-out"
    async with KafkaBroker.from_url(kafka_url(exactly_once=unique)) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"in", message_id="m1")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            with pytest.raises(TypeError, match="str to str"):
                await delivery.produce(out, b"bad", headers={"n": 1})  # type: ignore[dict-item]
            assert delivery.outputs == []
            first = await delivery.produce(
                out, b"a", headers={"oncely-key": "kä", "x": "é", "oncely-message-id": "gone"}
            )
            second = await delivery.produce(out, b"b", message_id="chosen")
            await delivery.ack()
    assert (first, second) == ("m1/0", "chosen")
    records = await read_topic(out)
    assert [r.value for r in records] == [b"a", b"b"]
    assert records[0].key == "kä".encode()
    assert dict(records[0].headers) == {
        "oncely-key": "kä".encode(),
        "x": "é".encode(),
        "oncely-message-id": b"m1/0",
    }
    assert records[1].key is None
    assert dict(records[1].headers) == {"oncely-message-id": b"chosen"}
