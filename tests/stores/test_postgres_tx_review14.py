"""A transactional handler whose store goes away under its own statement: the connection is
the store's, so the failure is the store's, deferred and spending no attempt, as when the
outage meets the completion instead (``test_postgres_tx_store_down``). Before, the driver's
connection error came out of the handler's statement unchanged and counted as the handler
failing: with ``max_attempts=1`` the message was dead-lettered at once, for an effect that
never committed, and a longer outage used up every attempt the same way."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import oncely
from tests._wait import eventually
from tests.stores._outbox_support import PG_URL, FaultProxy, pg_behind_proxy

pytestmark = pytest.mark.anyio


async def test_an_outage_under_the_handler_s_own_statement_defers_and_spends_no_attempt(
    unique: str, anyio_backend: object
) -> None:
    proxy, via = await pg_behind_proxy(FaultProxy)
    table = f"oncely_{unique.replace('-', '_')}"
    effects = f"{table}_effects"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f"CREATE TABLE {effects} (key text NOT NULL)")
    app = oncely.App()
    runs: list[int] = []

    @app.handler(
        "t",
        name="tx",
        idempotent=True,
        transactional=True,
        retry=oncely.RetryPolicy(max_attempts=1),
        visibility=3.0,  # the lease the failed release leaves runs out soon
    )
    async def handle(payload: dict[str, Any], ctx: oncely.Context) -> None:
        runs.append(1)
        if len(runs) == 1:
            proxy.cut()  # the store goes away before the handler writes its effect
        await ctx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")

    store = f"{via}?table={table}&command_timeout=2"
    try:
        async with oncely.Worker(app, broker=f"memory://{unique}", store=store) as worker:
            await app.publish("t", {}, key="k")
            await eventually(lambda: worker.stats.deferred + worker.stats.dead_lettered >= 1)
            assert worker.stats.dead_lettered == 0
            proxy.restore()
            await eventually(lambda: worker.stats.processed == 1, within=30)
            assert worker.stats.dead_lettered == 0 and worker.stats.retried == 0
        assert await admin.fetchval(f"SELECT count(*) FROM {effects}") == 1
        assert len(runs) == 2
    finally:
        await proxy.aclose()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.execute(f"DROP TABLE IF EXISTS {effects}")
        await admin.close()
