"""Apps that the CLI tests run in a real ``oncely run`` subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oncely
from oncely.brokers.memory import MemoryBroker
from tests.runtime._faulty import WrappedBroker


class BadConsumeBroker(WrappedBroker):
    """A third-party-like broker whose ``consume`` rejects its arguments, as a broker does on
    ``visibility=-1``."""

    @classmethod
    def from_url(cls, url: str) -> BadConsumeBroker:
        def refuse() -> None:
            raise ValueError("visibility must be > 0, got -1")

        broker = cls(MemoryBroker(), on_consume=refuse)
        broker.url = url
        return broker


oncely.register_broker("badconsume", "tests.runtime.cli_apps:BadConsumeBroker")

app = oncely.App("cli-apps")


@app.handler("slow", idempotent=True, key="payload:id", concurrency=2)
async def slow(job: dict[str, Any]) -> None:
    # Tells the test it is running, then outlives any grace the test is willing to wait.
    _mark(job["id"])
    await asyncio.sleep(120)
    _mark("finished")


def _mark(text: str) -> None:
    Path(os.environ["CLI_APPS_STARTED"]).write_text(text)


stubborn_app = oncely.App("cli-apps-stubborn")


@stubborn_app.handler("stubborn", visibility=1.0)
async def stubborn(job: dict[str, Any]) -> None:
    # Swallows every cancel (a shutdown's included) and runs on: a handler bug the worker
    # must not wait on for ever.
    _mark(job["id"])
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            _mark("swallowed")


exiting_app = oncely.App("cli-apps-exiting")


@exiting_app.handler(
    "exiting", guarantee="at_least_once", concurrency=2, retry=oncely.RetryPolicy(max_attempts=1)
)
async def exiting(job: dict[str, Any]) -> None:
    # "exit" calls sys.exit(3) while "slow" is in flight; "slow" then finishes in the drain,
    # once the test lets it.
    started = Path(os.environ["CLI_APPS_STARTED"])
    if job["id"] == "exit":
        await _until(started.exists)
        sys.exit(3)
    _mark(job["id"])
    await _until(Path(os.environ["CLI_APPS_GO"]).exists)


async def _until(cond: Callable[[], bool], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the test did not go on")
        await asyncio.sleep(0.01)
