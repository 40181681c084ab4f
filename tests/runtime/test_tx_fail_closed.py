"""README, "When the store is down": transactional handlers always fail closed, even with
``fail_open``. A transactional handler needs the lease to hold a transaction; running it
without dedupe would also run it without the store's transaction."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

import oncely
from oncely.stores.sqlite import SqliteStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class FlakySqliteStore(SqliteStore):
    """A real SQLite store whose ``begin`` can be switched off, as if unreachable."""

    down = True

    async def begin(self, key: str, fingerprint: str, lease: float) -> oncely.Begin:
        if self.down:
            raise oncely.StoreUnavailable("store is down")
        return await super().begin(key, fingerprint, lease)


class Order(msgspec.Struct):
    id: str


async def test_a_transactional_handler_fails_closed_with_fail_open(
    unique: str, tmp_path: Path
) -> None:
    app = oncely.App()
    runs = 0

    @app.handler(
        unique,
        idempotent=True,
        transactional=True,
        key="payload:id",
        retry=oncely.RetryPolicy(max_attempts=50, base=0.01),
    )
    async def handle(order: Order, ctx: oncely.Context) -> None:
        nonlocal runs
        runs += 1
        await ctx.connection.execute("SELECT 1")

    store = FlakySqliteStore(tmp_path / "keys.db")
    settings = oncely.Settings(fail_open=True)
    try:
        async with oncely.Worker(
            app, broker=f"memory://{unique}", store=store, settings=settings
        ) as w:
            await app.publish(unique, Order("a"))
            await eventually(lambda: w.stats.deferred >= 2)
            assert runs == 0 and w.stats.fail_open == 0
            store.down = False
            await eventually(lambda: w.stats.processed == 1)
    finally:
        await store.aclose()
    assert runs == 1 and w.stats.fail_open == 0
