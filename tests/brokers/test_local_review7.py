"""The embedded brokers refuse a publish no handler could ever consume."""

from __future__ import annotations

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
