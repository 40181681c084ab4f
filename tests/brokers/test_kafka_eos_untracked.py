"""Exactly-once outputs wait for their commit as tuples of ``str`` and ``bytes`` only, which the
garbage collector untracks (``_kafka_delivery.Output``): held as lists, a transaction's worth
per partition was carried into the older generations and made every collection of the copy
dearer. Real Kafka."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence

import pytest

from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers.kafka import KafkaBroker
from tests.brokers.kafka_support import kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _untracked_within_collections(held: Sequence[object], passes: int = 8) -> bool:
    """Whether every object of ``held`` is untracked after at most ``passes`` collections. A
    pass untracks a tuple whose items are all untracked already, and may meet an outer tuple
    before the ones in it: nested tuples take a pass a level. A list inside keeps its tuple
    tracked for good."""
    for _ in range(passes):
        gc.collect()
        if not any(gc.is_tracked(item) for item in held):
            return True
    return False


async def test_outputs_waiting_for_their_commit_are_untracked(unique: str) -> None:
    out = f"{unique}-out"
    # No budget runs out while the test looks: the outputs wait until the close commits them.
    url = kafka_url(exactly_once=unique, txn_messages=1000, txn_interval=3600)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"in")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            assert isinstance(delivery, ExactlyOnceDelivery)
            await delivery.produce(out, b"a", headers={"oncely-key": "k", "x": "y"})
            await delivery.produce(out, b"b")
            held = list(delivery.outputs)
            assert _untracked_within_collections(held)
            await delivery.ack()
            txn = delivery.track.eos
            assert [offset for offset, _ in txn.pending] == [delivery.record.offset]
            assert _untracked_within_collections(txn.pending)
    records = await read_topic(out)
    assert [(r.value, r.key) for r in records] == [(b"a", b"k"), (b"b", None)]
    assert dict(records[0].headers)["x"] == b"y"
