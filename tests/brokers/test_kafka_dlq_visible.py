"""A Kafka purge or replay returns only once a listing can see it.

Kafka answers a transaction's commit before the coordinator has written the commit markers
into the partitions; until then the last stable offset stays before the new records, and a
``read_committed`` listing stops there. The purge and replay markers are such records, so a
listing straight after a purge could still show every letter it hid (CI saw it once, on a
partition whose leader had just moved). Another producer's open transaction on the DLQ holds
the last stable offset back the same way, for as long as it stays open: that is how these
tests make the wait observable without timing it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiokafka import AIOKafkaProducer

from oncely.brokers.base import ALL, Broker, DeadLetterAdmin
from oncely.brokers.registry import broker_from_url
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url
from tests.brokers.test_dlq_admin import dead_letter

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def listed(broker: Broker, topic: str) -> list[str]:
    assert isinstance(broker, DeadLetterAdmin)
    return sorted(x.id for x in await broker.dead_letters(topic, limit=ALL))


async def test_purge_and_replay_are_listed_as_done_when_they_return(unique: str) -> None:
    async with broker_from_url(kafka_url()) as broker:
        assert isinstance(broker, DeadLetterAdmin)
        await dead_letter(broker, unique, {f"m-{i}": b"body" for i in range(6)}, "boom")
        assert await listed(broker, unique) == [f"m-{i}" for i in range(6)]
        assert await broker.replay(unique, ids=["m-0", "m-1"]) == 2
        assert await listed(broker, unique) == [f"m-{i}" for i in range(2, 6)]
        assert await broker.purge(unique) == 4
        assert await listed(broker, unique) == []


async def test_a_purge_waits_for_its_markers_behind_an_open_transaction(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A short request_timeout bounds the wait: past it the purge is committed all the same,
    # and says that a listing may not show it yet.
    async with broker_from_url(kafka_url(request_timeout="3s")) as broker:
        assert isinstance(broker, DeadLetterAdmin)
        await dead_letter(broker, unique, {"a": b"1", "b": b"2"}, "boom")
        holder = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP, transactional_id=f"hold-{unique}", enable_idempotence=True
        )
        await holder.start()
        try:
            await holder.begin_transaction()
            await holder.send_and_wait(f"{unique}.dlq", b"", key=b"held")
            with caplog.at_level(logging.WARNING, logger="oncely.brokers.kafka"):
                assert await broker.purge(unique) == 2
            warned = [m for r in caplog.records if "not yet visible" in (m := r.getMessage())]
            assert len(warned) == 1 and f"{unique}.dlq" in warned[0]
            # The open transaction hides the markers, so the letters are still listed.
            assert await listed(broker, unique) == ["a", "b"]
        finally:
            await holder.abort_transaction()
            await holder.stop()
        # Its end lets the last stable offset pass the markers, once the coordinator has
        # written the abort marker (in the background too): then nothing is left.
        deadline = time.monotonic() + 30
        while await listed(broker, unique):
            assert time.monotonic() < deadline, "the purge never showed after the abort"
            await asyncio.sleep(0.05)
