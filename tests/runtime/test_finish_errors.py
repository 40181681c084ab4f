"""A settle that a shutdown cancel handed on to a task of its own and that then failed is
reported, not dropped."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import oncely
from tests._wait import eventually
from tests.runtime._faulty import FaultyStore

pytestmark = pytest.mark.anyio


class BrokenPolicy(oncely.RetryPolicy, frozen=True, kw_only=True):
    """A user's policy with a bug in ``delay``: the failure's settle raises after its release."""

    def delay(self, attempt: int) -> float:
        raise ZeroDivisionError("bug in a retry policy")


async def test_a_handed_on_settle_that_fails_is_logged_and_counted(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    release_entered = asyncio.Event()
    go = asyncio.Event()

    class SlowRelease(FaultyStore):
        async def release(self, key: str, token: str) -> None:
            release_entered.set()
            await go.wait()  # the cancel at the end of the grace lands here
            await super().release(key, token)

    app = oncely.App()

    @app.handler("jobs", idempotent=True, key="payload:id", retry=BrokenPolicy())
    async def handle(_: Any) -> None:
        raise ValueError("handler failed")

    worker = oncely.Worker(
        app,
        broker=f"memory://{unique}",
        store=SlowRelease(),
        settings=oncely.Settings(grace_period=0.05),
    )
    await worker.start()
    try:
        await app.publish("jobs", {"id": "a"})
        await asyncio.wait_for(release_entered.wait(), 10)
        stopping = asyncio.create_task(worker.stop())
        await eventually(lambda: "cancelling 1 handler(s)" in caplog.text)
        go.set()
        await asyncio.wait_for(stopping, 10)
    finally:
        await worker.stop(0.0)
    # Before, Finisher.wait gathered the handed-on settle with return_exceptions=True and
    # nothing said it had failed.
    assert worker.stats.internal_errors == 1, worker.stats
    (record,) = [
        r
        for r in caplog.records
        if "bug in a retry policy" in r.getMessage()
        or (r.exc_info and "bug in a retry policy" in str(r.exc_info[1]))
    ]
    assert record.levelno == logging.ERROR and record.exc_info is not None
