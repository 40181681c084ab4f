"""Review 10: a handler result the codec cannot encode. The effect has happened, so the run
counts as done (key completed, message acked); only the cached result is missing. A duplicate
is absorbed, and its ``on_duplicate`` hook gets ``None``. Counted and logged once per run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

import oncely
from oncely.stores.memory import MemoryStore
from oncely.stores.sqlite import SqliteStore
from tests._wait import eventually

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


def _cyclic() -> list[Any]:
    """msgspec raises RecursionError on it, not the TypeError of an unsupported type."""
    value: list[Any] = []
    value.append(value)
    return value


@pytest.mark.parametrize("result", [_cyclic, object], ids=["cyclic", "unsupported-type"])
async def test_an_unencodable_result_completes_the_key_once(
    unique: str, result: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "oncely.worker")
    app = oncely.App()
    runs = 0
    hooked: list[object] = []

    async def again(cached: object, ctx: oncely.Context) -> None:
        hooked.append(cached)

    @app.handler("r", idempotent=True, on_duplicate=again)
    async def handle(_: dict[str, Any]) -> object:
        nonlocal runs
        runs += 1
        return result()

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        first = await app.publish("r", {}, key="once")
        await app.publish("r", {}, key="once")
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.duplicates == 1)
    # Before: RecursionError was a handler failure, retried, and the effect ran again.
    assert runs == 1 and worker.stats.retried == 0 and hooked == [None]
    assert worker.stats.results_not_cached == 1
    logged = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert len(logged) == 1 and first in logged[0], logged


async def test_a_transactional_handler_commits_its_effect_without_the_result(
    unique: str, tmp_path: Path
) -> None:
    app = oncely.App()
    runs = 0

    @app.handler("t", idempotent=True, transactional=True)
    async def handle(_: Any, ctx: oncely.Context) -> object:
        nonlocal runs
        runs += 1
        return _cyclic()

    store = SqliteStore(tmp_path / "s.db")
    worker = oncely.Worker(app, broker=f"memory://{unique}", store=store)
    async with store, worker:
        await app.publish("t", {}, key="once")
        await app.publish("t", {}, key="once")
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.duplicates == 1)
    # Before: the transaction rolled back and the run was retried until its attempts ran out.
    assert runs == 1 and worker.stats.results_not_cached == 1 and worker.stats.retried == 0
