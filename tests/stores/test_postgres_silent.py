"""A PostgreSQL that stops answering without closing anything (a frozen host, a partition:
no RST, no FIN) while a transactional handler records its completion.

The completion statement times out after ``command_timeout``; asyncpg then asks the server to
cancel it on a connection of its own, which the silent server never answers, and the
``ROLLBACK`` of the cleanup waits for that cancel. Unbounded, the transaction's exit (and the
handler's task, its concurrency slot, the worker's shutdown) waited for ever. Bounded, the
connection is terminated (the server rolls back on its own) and the caller gets
``StoreUnavailable``: nothing committed, the message is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from oncely.errors import StoreUnavailable
from oncely.stores.base import Outcome
from oncely.stores.postgres import PostgresStore
from tests.stores._freeze import FreezingProxy, pg_behind_freezing_proxy
from tests.stores._outbox_support import PG_URL

pytestmark = pytest.mark.anyio


async def sql(query: str) -> list[Any]:
    conn = await asyncpg.connect(PG_URL)
    try:
        rows: list[Any] = await conn.fetch(query)
        return rows
    finally:
        await conn.close()


@pytest.fixture
async def proxied(anyio_backend: object) -> AsyncIterator[tuple[FreezingProxy, str]]:
    proxy, via = await pg_behind_freezing_proxy()
    try:
        yield proxy, via
    finally:
        await proxy.aclose()


async def test_a_completion_that_meets_a_silent_server_fails_within_bounds(
    proxied: tuple[FreezingProxy, str], unique: str
) -> None:
    proxy, via = proxied
    table = f"oncely_{unique.replace('-', '_')}"
    effects = f"{table}_effects"
    await sql(f"CREATE TABLE {effects} (key text NOT NULL)")
    store = PostgresStore.from_url(f"{via}?table={table}&pool_max=3&command_timeout=1")
    try:
        await store.connect()
        begun = await store.begin("k", "fp", 30.0)
        assert begun.outcome is Outcome.NEW and begun.token
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            # The bound of the test, far above the store's (1 s per statement and cleanup).
            async with asyncio.timeout(30):
                async with store.transaction("k", begun.token, 60.0) as tx:
                    await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")
                    proxy.freeze()
        assert time.monotonic() - started < 30
        proxy.thaw()
        # Nothing committed: no effect, and the key is still running under the token.
        assert await sql(f"SELECT key FROM {effects}") == []
        [row] = await sql(f"SELECT state, token FROM {table}")
        assert tuple(row) == ("running", begun.token)
    finally:
        proxy.thaw()
        await store.aclose()
        await sql(f"DROP TABLE IF EXISTS {table}")
        await sql(f"DROP TABLE IF EXISTS {effects}")
