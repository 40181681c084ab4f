"""A transactional handler that ends the store's transaction itself (``COMMIT`` or
``ROLLBACK`` on ``ctx.connection``) must not have its completion recorded.

After such a statement the connection is in autocommit: the completion would commit on its
own, apart from the handler's writes. After a ``ROLLBACK`` that records a completion for an
effect that never committed (the message is then acked as a duplicate on every redelivery:
the effect is lost, silently); after a ``COMMIT`` the effect and the record commit in two
steps, with a crash window between them. The store refuses instead: ``Reject`` (the runtime
dead-letters the message, with the reason; retrying would run a committed effect again), the
key stays running with the token (the runtime releases it), and no completion is written.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import pytest

import oncely
from oncely.errors import Reject
from oncely.runtime.codec import encode, fingerprint
from oncely.stores.base import Outcome, TransactionalStore
from oncely.stores.postgres import PostgresStore
from oncely.stores.sqlite import SqliteStore
from tests._wait import eventually

PG_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)


class Backend:
    """A transactional store, its effects table, and SQL of its dialect."""

    def __init__(self, store: TransactionalStore, dialect: str, effects: str, where: Any) -> None:
        self.store = store
        self.dialect = dialect
        self.effects = effects
        self.where = where  # a Path (SQLite) or the store's table name (PostgreSQL)

    def insert(self, marker: str) -> str:
        mark = "$1" if self.dialect == "postgresql" else "?"
        return f"INSERT INTO {self.effects} (marker) VALUES ({mark})"

    async def run(self, conn: Any, sql: str, *args: Any) -> None:
        if self.dialect == "postgresql":
            await conn.execute(sql, *args)
        else:
            await conn.execute(sql, args)

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        if self.dialect == "postgresql":
            conn = await asyncpg.connect(PG_URL)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()
        async with aiosqlite.connect(self.where) as db:
            return [tuple(r) for r in await db.execute_fetchall(sql)]

    async def state(self, key: str) -> list[tuple[Any, ...]]:
        table = self.where if self.dialect == "postgresql" else "oncely_idempotency"
        return await self.query(f"SELECT state FROM {table} WHERE key = '{key}'")


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str, anyio_backend: object
) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        async with aiosqlite.connect(path) as db:
            await db.execute("CREATE TABLE effects (marker TEXT PRIMARY KEY)")
            await db.commit()
        async with SqliteStore(path) as sqlite_store:
            yield Backend(sqlite_store, "sqlite", "effects", path)
        return
    table = f"oncely_{unique.replace('-', '_')}"
    effects = f"{table}_effects"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"CREATE TABLE {effects} (marker text PRIMARY KEY)")
        async with PostgresStore.from_url(f"{PG_URL}?table={table}&pool_max=3") as pg_store:
            yield Backend(pg_store, "postgresql", effects, table)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP TABLE IF EXISTS {effects}")
        await conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["ROLLBACK", "COMMIT"])
async def test_a_handler_that_ends_the_transaction_gets_no_completion_recorded(
    backend: Backend, ending: str
) -> None:
    store = backend.store
    begun = await store.begin("k", "fp", 30.0)
    assert begun.outcome is Outcome.NEW and begun.token
    with pytest.raises(Reject, match="ended the store's transaction"):
        async with store.transaction("k", begun.token, 60.0) as tx:
            await backend.run(tx.connection, backend.insert("m"), "m")
            await backend.run(tx.connection, ending)
            tx.result = b"done"
    # No completion: the key is still running under the token (the runtime releases it).
    assert await backend.state("k") == [("running",)]
    again = await store.begin("k", "fp", 30.0)
    assert again.outcome is Outcome.IN_PROGRESS
    await store.release("k", begun.token)
    assert await backend.state("k") == []
    # The effect is what the handler's own statement made of it; oncely added nothing.
    expected = [("m",)] if ending == "COMMIT" else []
    assert await backend.query(f"SELECT marker FROM {backend.effects}") == expected


@pytest.mark.anyio
async def test_a_nested_transaction_of_the_handler_still_completes(backend: Backend) -> None:
    """The check does not refuse what the handler may do: a nested transaction (a savepoint
    on PostgreSQL) leaves the store's transaction open."""
    store = backend.store
    begun = await store.begin("k", "fp", 30.0)
    assert begun.token
    async with store.transaction("k", begun.token, 60.0) as tx:
        conn = tx.connection
        if backend.dialect == "postgresql":
            async with conn.transaction():
                await conn.execute(backend.insert("m"), "m")
        else:
            await conn.execute("SAVEPOINT s")
            await conn.execute(backend.insert("m"), ("m",))
            await conn.execute("RELEASE SAVEPOINT s")
        tx.result = b"done"
    assert await backend.state("k") == [("completed",)]
    assert await backend.query(f"SELECT marker FROM {backend.effects}") == [("m",)]


@pytest.mark.anyio
async def test_the_worker_dead_letters_the_message_and_leaves_the_key_free(
    unique: str, tmp_path: Path
) -> None:
    """End to end on SQLite: the message goes to the dead-letter queue with the reason (not
    acked as done, not retried), and its key is released."""
    store = SqliteStore(tmp_path / "s.db")
    app = oncely.App()
    runs: list[int] = []

    @app.handler("t", name="tx", idempotent=True, transactional=True)
    async def handle(_: Any, ctx: oncely.Context) -> None:
        runs.append(1)
        await ctx.connection.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER)")
        await ctx.connection.execute("INSERT INTO effects VALUES (1)")
        await ctx.connection.execute("ROLLBACK")

    worker = oncely.Worker(app, broker=f"memory://{unique}", store=store)
    async with store, worker:
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert worker.stats.rejected == 1 and worker.stats.processed == 0
        assert runs == [1]
        begun = await store.begin("tx:k", fingerprint(encode({})), 30.0)
        assert begun.outcome is Outcome.NEW  # released, not completed
