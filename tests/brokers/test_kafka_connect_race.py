"""The Kafka broker's client lifecycle under concurrent calls. Real Kafka.

A fresh broker connects on first use, from whichever call comes first; several first calls at
once must share one producer and one admin client (a second pair, started and then
overwritten, ran its background tasks and held its connections for the life of the process).
And a publish that arrives once ``aclose`` has begun must fail with ``ConnectionLost``, as on
the other brokers: not an ``AssertionError`` (the producer already dropped), and without
connecting a new producer that nobody will close.
"""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers.kafka import KafkaBroker
from oncely.errors import ConnectionLost, PublishFailed
from tests._wait import eventually
from tests.brokers.kafka_support import create_small_topic, kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _aiokafka_tasks() -> list[asyncio.Task[object]]:
    """Background tasks of aiokafka clients (a producer's sender, a client's metadata sync)."""
    tasks = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and "aiokafka" in getattr(code, "co_filename", ""):
            tasks.append(task)
    return tasks


async def test_concurrent_first_publishes_share_one_client(unique: str) -> None:
    async with KafkaBroker.from_url(kafka_url()) as maker:
        await maker.ensure_topics([unique])
    before = set(_aiokafka_tasks())
    broker = KafkaBroker.from_url(kafka_url())
    try:  # eight first calls at once, each finding the broker not connected yet
        await asyncio.gather(*(broker.publish(unique, b"%d" % i) for i in range(8)))
    finally:
        await broker.aclose()
    left = [t for t in _aiokafka_tasks() if t not in before]
    assert len(left) == 0, f"{len(left)} aiokafka tasks still running after aclose: {left[:3]}"
    assert sorted(r.value for r in await read_topic(unique)) == sorted(b"%d" % i for i in range(8))


async def test_a_publish_while_closing_fails_cleanly_and_connects_nothing(unique: str) -> None:
    await create_small_topic(unique, 2000)
    before = set(_aiokafka_tasks())
    broker = KafkaBroker.from_url(kafka_url())
    await broker.publish(unique, b"first")
    with pytest.raises(PublishFailed, match="MessageSizeTooLarge"):
        await broker.publish(unique, b"x" * 5000)
    # The refusal left the replaced producer retiring in the background, so aclose has a
    # task to wait for after it dropped the producer: the window a publish can fall into.
    closing = asyncio.create_task(broker.aclose())
    await eventually(lambda: broker._producer is None)
    with pytest.raises(ConnectionLost, match="closed"):
        await broker.publish(unique, b"late")
    await closing
    with pytest.raises(ConnectionLost, match="closed"):  # and for good, as the other brokers
        await broker.publish(unique, b"later")
    left = [t for t in _aiokafka_tasks() if t not in before]
    assert len(left) == 0, f"{len(left)} aiokafka tasks still running after aclose: {left[:3]}"
    assert [r.value for r in await read_topic(unique)] == [b"first"]
