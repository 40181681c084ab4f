"""An effectively-once app runs with no store configured on the embedded brokers, however the
broker is given: a URL with broker options, or a ready instance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import oncely
from oncely.brokers.base import Broker
from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.stores.memory import MemoryStore
from oncely.stores.sqlite import SqliteStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio

Make = Callable[[Path, str], "str | Broker"]

CASES: dict[str, tuple[Make, type]] = {
    "sqlite-url-with-options": (
        lambda tmp, _: f"sqlite:///{tmp / 'q.db'}?poll_interval=0.1",
        SqliteStore,
    ),
    "sqlite-instance": (lambda tmp, _: SqliteBroker(tmp / "q.db", poll_interval=0.1), SqliteStore),
    "sqlite-instance-from-url": (
        lambda tmp, _: SqliteBroker.from_url(f"sqlite:///{tmp / 'q.db'}?poll_interval=0.1"),
        SqliteStore,
    ),
    "memory-private-instance": (lambda tmp, _: MemoryBroker(), MemoryStore),
    "memory-named-instance": (
        lambda tmp, hub: MemoryBroker.from_url(f"memory://{hub}"),
        MemoryStore,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_effectively_once_runs_on_the_default_store(
    case: str, tmp_path: Path, unique: str
) -> None:
    make, store_type = CASES[case]
    app = oncely.App(idempotent=True)
    runs: list[int] = []

    @app.handler("jobs")
    async def handle(job: dict[str, int]) -> None:
        runs.append(job["n"])

    broker = make(tmp_path, unique)
    if isinstance(broker, Broker):
        await broker.connect()
    try:
        async with oncely.Worker(app, broker=broker) as worker:
            assert isinstance(worker.store, store_type)
            if isinstance(worker.store, SqliteStore):
                assert worker.store.path == tmp_path / "q.db"
            for _ in range(2):  # the duplicate is absorbed by the store
                await app.publish("jobs", {"n": 1}, key="k1")
            await app.publish("jobs", {"n": 2}, key="k2")
            await eventually(lambda: worker.stats.processed + worker.stats.duplicates >= 3)
    finally:
        if isinstance(broker, Broker):
            await broker.aclose()
    assert sorted(runs) == [1, 2]


async def test_the_default_memory_hub_keeps_its_keys_across_workers(unique: str) -> None:
    """``memory://`` is one hub shared by the whole process, so its default store is shared
    too: a second Worker on it must not run a key the first one completed."""
    app = oncely.App(idempotent=True)
    runs: list[int] = []
    topic = f"jobs-{unique}"

    @app.handler(topic)
    async def handle(job: dict[str, int]) -> None:
        runs.append(job["n"])

    for _ in range(2):
        async with oncely.Worker(app, broker="memory://") as worker:
            await app.publish(topic, {"n": 1}, key=unique)
            await eventually(lambda: worker.stats.processed + worker.stats.duplicates >= 1)
    assert runs == [1], "the second Worker ran a key the first one completed"
