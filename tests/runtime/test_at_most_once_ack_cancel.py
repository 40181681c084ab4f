"""A shutdown cancel that lands while an at-most-once message's ack (made before it runs) is
on its way."""

from __future__ import annotations

import logging

import pytest

import oncely
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, delete_queues, plain_client

pytestmark = pytest.mark.anyio


@pytest.mark.sqs
async def test_a_cancel_during_an_at_most_once_ack_gives_nothing_back_and_counts_lost(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oncely")
    app = oncely.App()
    runs: list[str] = []

    @app.handler(unique, guarantee="at_most_once", concurrency=1)
    async def handle(job: dict[str, str]) -> None:
        runs.append(job["id"])

    # Each ack waits up to 1 s for others to share its DeleteMessageBatch: the end of a
    # 0.1 s grace cancels the task in it, before the handler ran.
    url = SQS_URL + "&ack_window=1"
    worker = oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.1))
    try:
        await worker.start()
        await app.publish(unique, {"id": "a"})
        await eventually(lambda: worker.stats.received == 1, within=30)
        await worker.stop()
        # The ack went on without its caller and took the message. Before, the runtime also
        # nacked it as a give-back (its ChangeMessageVisibility failed on the deleted
        # message's receipt, a settle error; landing first, it made the message visible
        # again) and did not count it as lost.
        assert runs == []
        assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
        assert worker.stats.lost == 1, worker.stats
        assert "nack of" not in caplog.text, caplog.text
        (record,) = [r for r in caplog.records if "so it is lost" in r.message]
        assert record.levelno == logging.WARNING
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
