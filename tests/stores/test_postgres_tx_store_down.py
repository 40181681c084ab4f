"""A transactional handler whose store goes away while it runs: the failure is the store's,
not the handler's, so the message is deferred (as a ``begin`` that finds the store down is),
and spends no attempt. With ``max_attempts=1`` it was dead-lettered at once, though the
handler never failed and, for a ``COMMIT`` whose reply was lost, its effect may well have
committed. Once the store is back the redelivery runs it (or finds it completed): one effect.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import oncely
from tests._wait import eventually
from tests.stores._outbox_support import PG_URL, FaultProxy, pg_behind_proxy

pytestmark = pytest.mark.anyio


async def test_a_store_outage_inside_a_transaction_defers_and_spends_no_attempt(
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
        await ctx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
        if len(runs) == 1:
            proxy.cut()  # the store goes away before the completion is recorded

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
