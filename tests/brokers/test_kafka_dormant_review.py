"""Review of dormant exactly-once retry partitions (``_kafka_eos``): taking one late must not
move its start past records already there. Real Kafka."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers._kafka_options import retry_topic
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url, read_topic
from tests.brokers.test_kafka_eos import eventually_offsets_within

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_retry_record_runs_when_a_latest_group_takes_its_partition_late(
    unique: str,
) -> None:
    """A new group reading from the latest offset: its retry partition has no committed
    offset, and the record that wakes it is the first there. Taken at assignment, the
    partition started at the end as it was then; taken when that record is fetched, it
    started at the end as it is *now*, past the record, which never ran."""
    group, out = f"g-{unique}", f"{unique}-out"
    retry = TopicPartition(retry_topic(unique, 1.0), 0)
    url = kafka_url(group, exactly_once=unique, txn_messages=1, auto_offset_reset="latest")
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first_task = asyncio.create_task(sub.__anext__())
            main = TopicPartition(unique, 0)
            await eventually(lambda: main in sub.tracks, 30)
            eos, consumer = sub._eos, sub.consumer
            assert eos is not None and consumer is not None and retry in eos._dormant
            await consumer.position(retry)  # type: ignore[no-untyped-call]  # at the end, now
            await broker.publish(unique, b"a")
            first = await asyncio.wait_for(first_task, 15)
            assert isinstance(first, ExactlyOnceDelivery)
            await first.nack(0.5)  # its copy goes to the 1s retry topic
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert isinstance(again, ExactlyOnceDelivery)
            assert (again.id, again.attempt, again.record.topic) == (first.id, 2, retry.topic)
            await again.produce(out, b"out-a")
            await again.ack()
    assert [r.value for r in await read_topic(out)] == [b"out-a"]
    # Committed in the ack's transaction: Kafka answers the commit before its markers reach
    # the group's offsets, and until they do the group still reads the previous offset.
    await eventually_offsets_within(group, retry.topic, {0: 1}, 30)


@pytest.mark.parametrize("when", ["at once", "once its producer is registered"])
async def test_no_transactional_producer_outlives_a_close_during_a_take(
    unique: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dormant partition woken just before the close: whether the close finds its take
    starting the producer or reading the offset, every producer made is stopped. (The
    subscription's own maps are emptied by the close whatever happened to the producers,
    so this looks at the producers themselves.)"""
    retry = TopicPartition(retry_topic(unique, 1.0), 0)
    async with KafkaBroker.from_url(kafka_url(exactly_once=unique)) as broker:
        made, _ = track_producers(broker, monkeypatch)
        await broker.publish(unique, b"a")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        first = await asyncio.wait_for(sub.__anext__(), 15)
        eos = sub._eos
        assert eos is not None
        eos.wake(retry, 0)  # as a fetched record of it would
        if when != "at once":
            await eventually(lambda: retry in eos._txns, 30)
        await first.ack()
        await sub.aclose()
        assert len(made) == 2  # the input partition's and the retry partition's
        assert [p._closed for p in made] == [True, True]


async def test_a_retry_from_a_dormant_partition_does_not_run_before_it_is_due(
    unique: str,
) -> None:
    """Taking the partition when its record is fetched must not skip the delay: the record
    runs once its ``oncely-due`` time has passed, never before."""
    retry = TopicPartition(retry_topic(unique, 5.0), 0)
    async with KafkaBroker.from_url(kafka_url(exactly_once=unique, txn_messages=1)) as broker:
        await broker.publish(unique, b"a")
        async with broker.consume(unique, prefetch=4, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 15)
            eos = sub._eos
            assert eos is not None and retry in eos._dormant
            await first.nack(2.0)  # to the 5s retry topic, due in 2s
            again = await asyncio.wait_for(sub.__anext__(), 30)
            ran_at = time.time()
            assert (again.id, again.record.topic) == (first.id, retry.topic)
            assert retry in eos._txns  # it was taken from dormant on the way
            due = float(dict(again.record.headers)["oncely-due"])
            assert ran_at >= due
            await again.ack()


async def test_a_take_cancelled_while_it_stops_an_earlier_producer_leaves_none_running(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A take finds a producer of an earlier ownership nobody released and stops it; cancelled
    then (a revoke or close), the producer it had just started must be stopped too. It was
    registered only after that stop, so the cancel left it running, unknown to anyone."""
    from oncely.brokers._kafka_txn import Txn

    retry = TopicPartition(retry_topic(unique, 1.0), 0)
    async with KafkaBroker.from_url(kafka_url(exactly_once=unique)) as broker:
        made, make = track_producers(broker, monkeypatch)
        await broker.publish(unique, b"a")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        first = await asyncio.wait_for(sub.__anext__(), 15)
        eos = sub._eos
        assert eos is not None
        stale = Txn(retry, make(f"{unique}-stale"))
        eos._txns[retry] = stale
        stopping, never = asyncio.Event(), asyncio.Event()
        stop = eos._stop

        async def slow_stop(txn: Any) -> None:
            if txn is stale:
                stopping.set()
                await never.wait()  # the take is cancelled here
            await stop(txn)

        monkeypatch.setattr(eos, "_stop", slow_stop)
        eos.wake(retry, 0)  # as a fetched record of it would
        await asyncio.wait_for(stopping.wait(), 30)
        await eos.forget({retry})
        assert len(made) == 2  # the input partition's and the take's
        assert made[1]._closed, "the take's producer outlived its cancel"
        await stop(stale)  # the stop the cancel cut short
        await first.ack()
        await sub.aclose()


def track_producers(
    broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Any], Callable[[str], Any]]:
    """Record every transactional producer ``broker`` makes from now on; also returns the
    maker itself, for a producer the test makes outside the record."""
    made: list[Any] = []
    make = broker.transactional_producer

    def tracked(transactional_id: str) -> Any:
        producer = make(transactional_id)
        made.append(producer)
        return producer

    monkeypatch.setattr(broker, "transactional_producer", tracked)
    return made, make
