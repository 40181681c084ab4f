"""A shutdown cancel that lands while an at-most-once message's ack (made before it runs) is
on its way."""

from __future__ import annotations

import logging

import pytest

import oncely
from tests._wait import eventually
from tests.brokers.test_sqs import delete_queues, queue_counts
from tests.runtime.test_shutdown_ack import cut_in_its_ack

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

    worker = cut_in_its_ack(app)  # cancels the task in the ack made before the handler ran
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
        assert await queue_counts(unique) == ("0", "0")
    finally:
        await worker.stop(0.0)
        await delete_queues([unique])
