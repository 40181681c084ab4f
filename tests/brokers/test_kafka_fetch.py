# mypy: disallow-untyped-calls=False
"""A whole fetch is taken from aiokafka with the garbage collector paused (``_kafka_fetch``):
no collection runs while its records are decoded, every record comes back once and in order,
and the application's collector setting is left as it was. Real Kafka."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from oncely.brokers._kafka_fetch import fetch
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

RECORDS = 6_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _fill(topic: str) -> None:
    kafka_url()  # this run made topics: the run's cleanup deletes them
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, b"%d" % i, key=b"k", headers=[("h", b"%d" % i)])
            for i in range(RECORDS)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _read_all(topic: str) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Every record of ``topic`` through ``fetch``, and per call that returned records: how
    many it returned and how many collections ran during it."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False
    )
    runs = [0]

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            runs[0] += 1

    await consumer.start()
    gc.callbacks.append(count)
    values: list[bytes] = []
    calls: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(60):
            while len(values) < RECORDS:
                before = runs[0]
                batch = await fetch(consumer, 100)
                taken = [r.value for records in batch.values() for r in records]
                if taken:
                    calls.append((len(taken), runs[0] - before))
                values += taken
    finally:
        gc.callbacks.remove(count)
        await consumer.stop()
    return values, calls


async def test_a_whole_fetch_is_taken_without_a_collection_and_nothing_is_lost(
    unique: str,
) -> None:
    await _fill(unique)
    assert gc.isenabled()
    values, calls = await _read_all(unique)
    assert values == [b"%d" % i for i in range(RECORDS)]  # once each, in order
    big = [(n, runs) for n, runs in calls if n > 2_000]
    # Thousands of records make some 10,000 containers: with the collector on, aiokafka's
    # decoding of them ran over a dozen young collections in that one call.
    assert big, calls
    assert all(runs <= 1 for _, runs in big), calls  # at most the wait's, before the drain
    assert gc.isenabled()


async def test_the_applications_disabled_collector_stays_disabled(unique: str) -> None:
    await _fill(unique)
    gc.disable()
    try:
        values, _ = await _read_all(unique)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert values == [b"%d" % i for i in range(RECORDS)]


async def test_fetch_waits_and_returns_nothing_when_no_record_comes(unique: str) -> None:
    kafka_url()
    consumer = AIOKafkaConsumer(
        unique, bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await fetch(consumer, 200) == {}  # an empty (auto-created) topic
        assert loop.time() - started >= 0.19  # it waited, as getmany(timeout_ms=200) does
        assert gc.isenabled()
    finally:
        await consumer.stop()
