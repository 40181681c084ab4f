"""The embedded brokers refuse a publish no handler could ever consume."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.errors import ConfigError

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_publishing_to_an_empty_topic_is_a_config_error(tmp_path: Path, kind: str) -> None:
    # Before, SQLite stored it and memory queued it: App.handler refuses the topic "", so
    # nothing could consume it, while `oncely publish '' ...` printed an id and exited 0.
    broker = SqliteBroker(tmp_path / "q.db") if kind == "sqlite" else MemoryBroker()
    async with broker:
        with pytest.raises(ConfigError, match="topic must be a non-empty string, got ''"):
            await broker.publish("", b"{}")
        await broker.publish("t", b"{}")  # a named topic still goes through


SCRIPT = """
import asyncio, sys, oncely
async def main():
    if sys.argv[2] == "publisher":
        await oncely.Publisher(sys.argv[1]).publish("t", {"n": 1})
    else:
        await oncely.App("a", broker=sys.argv[1]).publish("t", {"n": 1})
asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["publisher", "app"])
async def test_a_script_that_never_closes_its_publisher_still_exits(
    tmp_path: Path, how: str
) -> None:
    # README: "Outside a worker, publish with oncely.Publisher(url) or App(broker=url)".
    # Before, aiosqlite's non-daemon thread kept such a script alive for ever after main().
    url = f"sqlite:///{tmp_path / 'q.db'}"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", SCRIPT, url, how],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    async with SqliteBroker(tmp_path / "q.db") as broker:
        assert await broker.backlog("t") == {"": 1}  # confirmed, so it is there


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_an_endless_delay_is_refused(tmp_path: Path, kind: str) -> None:
    # Before, both took it: with no max_delay to clamp it, the message (a publish, or a
    # delivery nacked with it) never became visible again, and nothing said so.
    broker = SqliteBroker(tmp_path / "q.db") if kind == "sqlite" else MemoryBroker()
    async with broker:
        with pytest.raises(ValueError, match="delay must be a finite number >= 0, got inf"):
            await broker.publish("t", b"{}", delay=math.inf)
        await broker.publish("t", b"{}")
        async with broker.consume("t", prefetch=1, visibility=5) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 5)
            with pytest.raises(ValueError, match="delay must be a finite number"):
                await delivery.nack(math.inf)
            await delivery.nack(0.0)
            again = await asyncio.wait_for(sub.__anext__(), 5)
            await again.ack()
