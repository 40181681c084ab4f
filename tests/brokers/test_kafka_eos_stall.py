"""Exactly-once: a commit that finishes with a full transaction's worth of records passed
meanwhile commits them at once. Those records are ``held`` in the partition's window; with the
window full no ack comes to commit them, and the partition used to stall until the poll loop's
next ``flush_due``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import oncely
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


@contextmanager
def commits_by_task() -> Iterator[list[str]]:
    """The name of the task that ran each transaction's commit."""
    names: list[str] = []
    original = ExactlyOnce._commit

    async def commit(self: ExactlyOnce, txn: Txn, track: PartitionTrack) -> None:
        task = asyncio.current_task()
        names.append(task.get_name() if task is not None else "")
        await original(self, txn, track)

    ExactlyOnce._commit = commit  # type: ignore[method-assign]
    try:
        yield names
    finally:
        ExactlyOnce._commit = original  # type: ignore[method-assign]


async def test_records_passed_during_a_commit_are_committed_without_the_poll_loop(
    unique: str,
) -> None:
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    # Small transactions in a window of two, and no time budget: the poll loop commits only
    # a transaction that is full and that no ack and no commit took.
    url = kafka_url(
        partitions=1,
        auto_offset_reset="earliest",
        exactly_once=src,
        txn_messages=20,
        window=40,
        txn_interval=3600,
    )
    n = 2000
    async with KafkaBroker.from_url(url) as broker:  # before the worker: one fetch brings all
        await broker.ensure_topics([src, out])
        await asyncio.gather(*(
            broker.publish(src, b"%d" % i, headers={"oncely-key": f"k{i % 50}"})
            for i in range(n)
        ))  # fmt: skip
    with commits_by_task() as names:
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == n, 120)
    by_poll_loop = [name for name in names if name.startswith("oncely-kafka-poll-")]
    assert names, "transactions were committed"
    assert by_poll_loop == [], f"{len(by_poll_loop)} of {len(names)} commits waited for a poll"
    copied = sorted(int(r.value) for r in await read_topic(out))
    assert copied == list(range(n)), "each exactly once"
