"""A shutdown cancel that lands while a finished handler's ack is on its way."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

import oncely
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, delete_queues, plain_client

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

    # Each ack waits up to 1 s for others to share its DeleteMessageBatch: the end of a 0.1 s
    # grace cancels the finished handler's task in it.
    url = SQS_URL + "&ack_window=1"
    worker = oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.1))
    try:
        await worker.start()
        await app.publish(unique, {"id": "a"})
        await eventually(lambda: runs == ["a"], within=30)
        await worker.stop()
        # Before, the give-back's ChangeMessageVisibility followed the delete and failed on
        # its receipt (a settle error), or, landing first, made the message visible again.
        assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
        assert "nack of" not in caplog.text, caplog.text
        async with plain_client() as client:
            queue = (await client.get_queue_url(QueueName=unique))["QueueUrl"]
            got = await client.get_queue_attributes(
                QueueUrl=queue,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        counts = got["Attributes"]
        assert counts["ApproximateNumberOfMessages"] == "0"
        assert counts["ApproximateNumberOfMessagesNotVisible"] == "0"
    finally:
        await worker.stop(0.0)
        await delete_queues([unique])
