"""A shutdown cancel that lands while a finished handler's ack is on its way."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.stores.memory import MemoryStore
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, delete_queues, queue_counts

pytestmark = pytest.mark.anyio


async def test_a_cancel_during_the_ack_of_a_finished_handler_gives_nothing_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oncely")
    db = tmp_path / "q.db"
    app = oncely.App()
    runs: list[str] = []
    started = asyncio.Event()
    go = asyncio.Event()
    returned = asyncio.Event()

    @app.handler("jobs", guarantee="at_least_once", concurrency=1)
    async def handle(job: dict[str, str]) -> None:
        runs.append(job["id"])
        started.set()
        await go.wait()
        returned.set()

    # Another process's write lock: the ack (a DELETE) waits for it, so the cancel at the end
    # of the grace finds the finished handler's task in the ack.
    lock = sqlite3.connect(db, isolation_level=None)
    worker = oncely.Worker(
        app, broker=f"sqlite:///{db}", settings=oncely.Settings(grace_period=0.2)
    )
    try:
        await worker.start()
        await app.publish("jobs", {"id": "a"})
        await asyncio.wait_for(started.wait(), 10)
        lock.execute("BEGIN IMMEDIATE")
        go.set()
        try:
            await asyncio.wait_for(returned.wait(), 10)
        except TimeoutError:
            lock.rollback()
            raise
        stopping = asyncio.create_task(worker.stop())
        try:
            await eventually(lambda: "cancelling 1 handler(s)" in caplog.text)
        finally:
            lock.rollback()
        await asyncio.wait_for(stopping, 30)
    finally:
        lock.close()
        await worker.stop(0.0)
    # The handler finished and its ack went through: before, the runtime also nacked it as a
    # give-back, which failed (the ack had deleted it: a settle error, a WARNING) or, had it
    # gone first, would have run the finished handler again.
    assert runs == ["a"]
    assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
    assert "nack of" not in caplog.text, caplog.text
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT count(*) FROM oncely_messages").fetchone() == (0,)


def cut_in_its_ack(app: oncely.App) -> oncely.Worker:
    """A worker on SQS whose stop cancels a task in its ack: each ack waits up to 1 s for
    others to share its DeleteMessageBatch, and the grace ends after 0.1 s."""
    url = SQS_URL + "&ack_window=1"
    return oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.1))


@pytest.mark.sqs
async def test_on_sqs_a_cancel_during_a_batched_ack_gives_nothing_back(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oncely")
    app = oncely.App()
    runs: list[str] = []

    @app.handler(unique, guarantee="at_least_once", concurrency=1)
    async def handle(job: dict[str, str]) -> None:
        runs.append(job["id"])

    worker = cut_in_its_ack(app)  # cancels the finished handler's task in its ack
    try:
        await worker.start()
        await app.publish(unique, {"id": "a"})
        await eventually(lambda: runs == ["a"], within=30)
        await worker.stop()
        # Before, the give-back's ChangeMessageVisibility followed the delete and failed on
        # its receipt (a settle error), or, landing first, made the message visible again.
        assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
        assert "nack of" not in caplog.text, caplog.text
        assert await queue_counts(unique) == ("0", "0")
    finally:
        await worker.stop(0.0)
        await delete_queues([unique])


class DriverError(Exception):
    """What some drivers raise when the task awaiting them is cancelled."""


async def test_a_shutdown_cancel_a_handler_turns_into_its_own_error_still_gives_back(
    unique: str,
) -> None:
    app = oncely.App()
    started = asyncio.Event()

    @app.handler("jobs", concurrency=1, retry=oncely.RetryPolicy(max_attempts=1))
    async def handle(_: dict[str, str]) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise DriverError("connection reset while waiting for a reply") from None

    url = f"memory://{unique}"
    worker = oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.1))
    await worker.start()
    await app.publish("jobs", {"id": "a"})
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.wait_for(worker.stop(), 10)
    # Before, the handler's error was its failure: with its one attempt spent the message was
    # dead-lettered by the shutdown (elsewhere: retried later, an attempt spent).
    assert worker.stats.dead_lettered == 0 and worker.stats.cancelled == 1, worker.stats
    broker = oncely.broker_from_url(url)
    async with broker, broker.consume("jobs", prefetch=1, visibility=5) as sub:
        again = await asyncio.wait_for(sub.__anext__(), 5)
        assert again.attempt == 1  # a deferral: the attempt is kept
        await again.ack()


async def test_a_timeout_a_handler_turns_into_its_own_error_is_a_timeout(unique: str) -> None:
    app = oncely.App()
    runs: list[int] = []

    @app.handler("jobs", concurrency=1, timeout=0.1, retry=oncely.RetryPolicy(max_attempts=1))
    async def handle(_: dict[str, str], ctx: oncely.Context) -> None:
        runs.append(ctx.attempt)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise DriverError("connection reset while waiting for a reply") from None

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("jobs", {"id": "a"})
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("jobs")
    assert runs == [1]
    assert letter.reason.startswith("HandlerTimeout: "), letter.reason


async def test_a_shutdown_cancel_an_on_duplicate_hook_turns_into_its_error_gives_back(
    unique: str,
) -> None:
    app = oncely.App()
    hooked = asyncio.Event()

    async def answer_again(result: None, ctx: oncely.Context) -> None:
        hooked.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            raise DriverError("connection reset while sending the reply") from None

    @app.handler(
        "jobs",
        idempotent=True,
        key="payload:id",
        concurrency=1,
        retry=oncely.RetryPolicy(max_attempts=1),
        on_duplicate=answer_again,
    )
    async def handle(_: dict[str, str]) -> None: ...

    url = f"memory://{unique}"
    store = MemoryStore()
    worker = oncely.Worker(app, broker=url, store=store, settings=oncely.Settings(grace_period=0.1))
    await worker.start()
    await app.publish("jobs", {"id": "a"})
    await eventually(lambda: worker.stats.processed == 1)
    await app.publish("jobs", {"id": "a"})
    await asyncio.wait_for(hooked.wait(), 10)
    await asyncio.wait_for(worker.stop(), 10)
    # Before: the hook's failure, dead-lettered on its one attempt by the shutdown.
    assert worker.stats.dead_lettered == 0 and worker.stats.nacked == 1, worker.stats
    broker = oncely.broker_from_url(url)
    async with broker, broker.consume("jobs", prefetch=1, visibility=5) as sub:
        again = await asyncio.wait_for(sub.__anext__(), 5)
        assert again.attempt == 1
        await again.ack()
