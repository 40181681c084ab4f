"""Exactly-once: a commit that finishes with a full transaction's worth of records passed
meanwhile commits them at once. Those records are ``held`` in the partition's window; with the
window full no ack comes to commit them, and the partition used to stall until the poll loop's
next ``flush_due``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import pytest

import oncely
from oncely.brokers._kafka_delivery import KafkaDelivery
from oncely.brokers._kafka_eos import ExactlyOnce
from oncely.brokers._kafka_track import PartitionTrack
from oncely.brokers._kafka_txn import Txn
from oncely.brokers.kafka import KafkaBroker
from oncely.errors import BrokerError
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


async def small_transactions_filled(src: str, out: str, n: int) -> str:
    """The URL of one-partition exactly-once copying from ``src`` to ``out``, with ``n``
    records published to ``src`` before any worker runs (one fetch brings them all).

    Small transactions in a window of two, and no time budget: the poll loop commits only a
    transaction that is full and that no ack and no commit took."""
    url = kafka_url(
        partitions=1,
        auto_offset_reset="earliest",
        exactly_once=src,
        txn_messages=20,
        window=40,
        txn_interval=3600,
    )
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        await asyncio.gather(*(
            broker.publish(src, b"%d" % i, headers={"oncely-key": f"k{i % 50}"})
            for i in range(n)
        ))  # fmt: skip
    return url


async def test_records_passed_during_a_commit_are_committed_without_the_poll_loop(
    unique: str,
) -> None:
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    n = 2000
    url = await small_transactions_filled(src, out, n)
    with commits_by_task() as names:
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == n, 120)
    by_poll_loop = [name for name in names if name.startswith("oncely-kafka-poll-")]
    assert names, "transactions were committed"
    assert by_poll_loop == [], f"{len(by_poll_loop)} of {len(names)} commits waited for a poll"
    copied = sorted(int(r.value) for r in await read_topic(out))
    assert copied == list(range(n)), "each exactly once"


async def test_a_failed_later_commit_does_not_fail_the_ack_whose_record_committed(
    unique: str,
) -> None:
    """The ack whose commit loops on (see above) had its record committed by the first
    transaction. A later one failing is recovered (the partition starts over from the
    committed offset); that ack must not report a failure, which the worker counts as a
    settle error and reads as "the record runs again", which it never does."""
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()
    runs: dict[bytes, int] = {}

    @app.handler(src, concurrency=8)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        runs[body] = runs.get(body, 0) + 1
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    n = 2000
    url = await small_transactions_filled(src, out, n)

    in_flush: ContextVar[list[int] | None] = ContextVar("in_flush", default=None)
    injected: list[int] = []
    failed_acks: list[bytes] = []
    flush, commit, ack = ExactlyOnce._flush, ExactlyOnce._commit, KafkaDelivery.ack

    async def counting_flush(self: ExactlyOnce, txn: Txn, **kwargs: bool) -> None:
        token = in_flush.set([0])
        try:
            await flush(self, txn, **kwargs)
        finally:
            in_flush.reset(token)

    async def failing_commit(self: ExactlyOnce, txn: Txn, track: PartitionTrack) -> None:
        commits = in_flush.get()
        task = asyncio.current_task()
        by_ack = task is not None and not task.get_name().startswith("oncely-kafka-poll-")
        if commits is not None:
            commits[0] += 1
            # The second commit of an ack's flush, once: before any I/O, so nothing is open.
            if by_ack and commits[0] == 2 and not injected:
                injected.append(track.head())
                raise BrokerError("injected: the second commit of the loop fails")
        await commit(self, txn, track)

    async def recording_ack(self: KafkaDelivery) -> None:
        try:
            await ack(self)
        except BrokerError:
            failed_acks.append(self.body)
            raise

    ExactlyOnce._flush = counting_flush  # type: ignore[method-assign]
    ExactlyOnce._commit = failing_commit  # type: ignore[method-assign]
    KafkaDelivery.ack = recording_ack  # type: ignore[method-assign]
    try:
        async with oncely.Worker(app, broker=url):
            await eventually(lambda: len(runs) == n and bool(injected), 120)
            # Every record whose ack failed runs again (its offset was not committed).
            await eventually(lambda: all(runs[body] >= 2 for body in failed_acks), 60)
    finally:
        ExactlyOnce._flush = flush  # type: ignore[method-assign]
        ExactlyOnce._commit = commit  # type: ignore[method-assign]
        KafkaDelivery.ack = ack  # type: ignore[method-assign]
    assert injected, "a second commit in one ack's flush was failed"
    copied = sorted(int(r.value) for r in await read_topic(out))
    assert copied == list(range(n)), "each exactly once"
