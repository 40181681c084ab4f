"""What ``on_duplicate`` gets, as README's "Answering duplicates" documents it: ``None`` for a
run that returned ``None``, and a failure of the hook for a stored result that no longer
decodes into the handler's return annotation."""

from __future__ import annotations

from typing import Any

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.stores.memory import MemoryStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


async def test_a_run_that_returned_none_gives_the_hook_none(unique: str) -> None:
    app = oncely.App()
    hooked: list[object] = []

    async def again(cached: object, ctx: oncely.Context) -> None:
        hooked.append(cached)

    @app.handler("r", idempotent=True, on_duplicate=again)
    async def handle(_: dict[str, Any]) -> dict[str, int] | None:
        return None

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        await app.publish("r", {}, key="k")
        await app.publish("r", {}, key="k")
        await eventually(lambda: worker.stats.duplicates == 1)
    assert hooked == [None] and worker.stats.results_not_cached == 0


async def test_a_stored_result_that_no_longer_decodes_fails_the_hook(unique: str) -> None:
    store = MemoryStore()
    url = f"memory://{unique}"
    before = oncely.App()

    async def again(cached: object, ctx: oncely.Context) -> None: ...

    @before.handler("r", name="h", idempotent=True, on_duplicate=again)
    async def first(_: dict[str, Any]) -> dict[str, str]:
        return {"id": "x"}

    async with oncely.Worker(before, broker=url, store=store) as worker:
        await before.publish("r", {}, key="k")
        await eventually(lambda: worker.stats.processed == 1)

    after = oncely.App()

    @after.handler(
        "r", name="h", idempotent=True, on_duplicate=again, retry=oncely.RetryPolicy(max_attempts=1)
    )
    async def second(_: dict[str, Any]) -> int:
        return 1

    async with oncely.Worker(after, broker=url, store=store) as worker:
        await after.publish("r", {}, key="k")
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("r")
    assert letter.reason.startswith("on_duplicate: "), letter.reason
    assert worker.stats.duplicates == 0 and worker.stats.processed == 0
