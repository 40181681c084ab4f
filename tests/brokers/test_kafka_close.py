"""Closing a Kafka subscription: the poll loop waiting for records is stopped at once (not
after its ``getmany``, up to 100 ms of every close), and exactly-once partitions make their
last commits together rather than one after another."""

from __future__ import annotations

import asyncio

import pytest

import oncely
from oncely.brokers._kafka_consume import KafkaSubscription
from oncely.brokers._kafka_eos import ExactlyOnce
from oncely.brokers._kafka_track import PartitionTrack
from oncely.brokers._kafka_txn import Txn
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def take(sub: KafkaSubscription, n: int) -> list[bytes]:
    """Ack the next ``n`` deliveries of ``sub``; their bodies."""
    bodies = []
    async with asyncio.timeout(60):
        for _ in range(n):
            delivery = await anext(sub)
            bodies.append(delivery.body)
            await delivery.ack()
    return bodies


async def test_a_close_stops_the_poll_loop_waiting_for_records_and_still_commits(
    unique: str,
) -> None:
    url = kafka_url(partitions=1, auto_offset_reset="earliest")
    async with KafkaBroker.from_url(url) as broker:
        for n in range(3):
            await broker.publish(unique, b"%d" % n)
        sub = broker.consume(unique, prefetch=8, visibility=30)
        assert sorted(await take(sub, 3)) == [b"0", b"1", b"2"]
        # Nothing more to fetch: the poll loop waits in getmany. Nothing is awaited between
        # seeing it there and the close's look at it.
        await eventually(lambda: sub._fetching, 30)
        await sub.aclose()
        assert sub._poller is not None and sub._poller.cancelled(), "stopped, not waited out"

        # The close still committed what was done: the same group reads only what follows.
        await broker.publish(unique, b"3")
        again = broker.consume(unique, prefetch=8, visibility=30)
        try:
            assert await take(again, 1) == [b"3"]
        finally:
            await again.aclose()


async def test_exactly_once_partitions_make_their_last_commits_together(unique: str) -> None:
    """No time or count budget closes a transaction here, so everything is committed by the
    close's release: one transaction per partition, all four under way at once, each output
    exactly once."""
    src, out = f"{unique}-in", f"{unique}-out"
    n = 400
    url = kafka_url(
        partitions=4,
        auto_offset_reset="earliest",
        exactly_once=src,
        txn_messages=100_000,
        txn_interval=3600,
        window=1000,
    )
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        await asyncio.gather(*(
            broker.publish(src, b"%d" % i, headers={"oncely-key": f"k{i}"}) for i in range(n)
        ))  # fmt: skip

    app = oncely.App()

    @app.handler(src, concurrency=16)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    running = 0
    most = 0
    commits = 0
    original = ExactlyOnce._commit

    async def commit(self: ExactlyOnce, txn: Txn, track: PartitionTrack) -> None:
        nonlocal running, most, commits
        running += 1
        commits += 1
        most = max(most, running)
        try:
            await original(self, txn, track)
        finally:
            running -= 1

    ExactlyOnce._commit = commit  # type: ignore[method-assign]
    try:
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == n, 60)
            assert commits == 0, "nothing is due before the close"
    finally:
        ExactlyOnce._commit = original  # type: ignore[method-assign]
    assert commits == 4, "one transaction per partition, at the close"
    assert most == 4, "the four partitions committed together"
    copied = sorted(int(r.value) for r in await read_topic(out))
    assert copied == list(range(n)), "each exactly once"
