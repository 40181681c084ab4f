"""A transactional handler that outlives its lease keeps it: the heartbeat renews
transactional leases too (a transaction may wait for a connection, or on PostgreSQL run
alongside other writers, for longer than the lease)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.runtime.codec import encode, fingerprint
from oncely.stores.base import StoreTransaction
from oncely.stores.memory import MemoryStore
from oncely.stores.sqlite import SqliteStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class RowLockStore(MemoryStore, oncely.TransactionalStore):
    """The real memory store, with a transaction that, like PostgreSQL's, locks nothing but
    its own work: other callers keep calling ``begin`` while it runs. Completion is recorded
    at the end of the transaction, guarded by the token."""

    renewals = 0

    @contextlib.asynccontextmanager
    async def transaction(
        self, key: str, token: str, ttl: float
    ) -> AsyncIterator[StoreTransaction]:
        tx = StoreTransaction(connection=None)
        yield tx
        await self.complete(key, token, tx.result, ttl)

    async def renew(self, key: str, token: str, lease: float) -> None:
        self.renewals += 1
        await super().renew(key, token, lease)


async def test_a_transactional_handler_longer_than_its_lease_keeps_it(unique: str) -> None:
    store = RowLockStore()
    app = oncely.App()
    release = asyncio.Event()

    @app.handler("t", name="tx", idempotent=True, transactional=True, visibility=1.5)
    async def handle(_: Any, ctx: oncely.Context) -> None:
        await release.wait()

    async with oncely.Worker(app, broker=f"memory://{unique}", store=store) as worker:
        await app.publish("t", {}, key="k")
        # Past the 1.5 s lease (a renewal every 0.5 s); seconds, not tenths, so that a stall
        # of the test process on a loaded machine is not taken for a lost lease.
        await eventually(lambda: store.renewals >= 4)
        other = await store.begin("tx:k", fingerprint(encode({})), 30)  # another worker
        assert other.outcome is oncely.Outcome.IN_PROGRESS
        release.set()
        await eventually(lambda: worker.stats.processed == 1)
    assert worker.stats.heartbeat_errors == 0


async def test_on_sqlite_the_heartbeat_renews_a_transactional_lease_without_blocking(
    unique: str, tmp_path: Path
) -> None:
    """SQLite's transaction holds the file's write lock, so no one can take the key over
    while it runs; the store skips those renewals rather than wait on its own lock."""
    store = SqliteStore(tmp_path / "s.db")
    app = oncely.App()
    beats: list[int] = []
    release = asyncio.Event()

    @app.handler("t", name="tx", idempotent=True, transactional=True, visibility=1.5)
    async def handle(_: Any, ctx: oncely.Context) -> None:
        await ctx.connection.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER)")
        await ctx.connection.execute("INSERT INTO effects VALUES (1)")
        await release.wait()

    original = store.renew

    async def counted(key: str, token: str, lease: float) -> None:
        beats.append(1)
        await original(key, token, lease)

    store.renew = counted  # type: ignore[method-assign]
    worker = oncely.Worker(app, broker=f"memory://{unique}", store=store)
    async with store, worker:
        await app.publish("t", {}, key="k")
        await eventually(lambda: len(beats) >= 4)
        release.set()
        await eventually(lambda: worker.stats.processed == 1)
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.duplicates == 1)
    assert worker.stats.heartbeat_errors == 0
