"""Edges of PostgreSQL's transactional mode: when the lease ends, and when a renewal meets the
end of a transaction.

A transaction whose lease ran out, but which no other worker took over, still commits: no one
else ran the handler, so its effect is the only one (the completion checks the token, not the
clock).

The runtime renews a transactional handler's lease until the handler's ``async with
store.transaction(...)`` has exited. Once the transaction committed, the row is completed and a
renewal changes nothing; it must not raise ``LeaseLost`` (the heartbeat would cancel the handler
and report a committed message as taken over) at any point before the context has exited.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

import oncely.stores._postgres_tx as postgres_tx
from oncely._postgres import release_quietly
from oncely.stores.base import Begin, Outcome
from oncely.stores.postgres import PostgresStore

URL = os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")


async def sql(query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(URL)
    try:
        rows: list[Any] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


@pytest.fixture
def table(unique: str) -> str:
    return f"oncely_{unique.replace('-', '_')}"


@pytest.fixture
async def store(table: str, anyio_backend: object) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=3") as store:
        yield store
    await sql(f"DROP TABLE IF EXISTS {table}")
    await sql(f"DROP TABLE IF EXISTS {table}_effects")


@pytest.mark.anyio
async def test_a_lease_that_ran_out_unclaimed_still_commits_its_transaction(
    store: PostgresStore, table: str
) -> None:
    effects = f"{table}_effects"
    await sql(f"CREATE TABLE {effects} (key text NOT NULL)")
    begun = await store.begin("k", "fp", 0.2)
    assert begun.outcome is Outcome.NEW and begun.token
    async with store.transaction("k", begun.token, 60.0) as tx:
        await tx.connection.execute(f"INSERT INTO {effects} VALUES ('k')")

        async def lease_over() -> bool:
            [row] = await sql(f"SELECT lease_until <= statement_timestamp() FROM {table}")
            return bool(row[0])

        deadline = time.monotonic() + 10
        while not await lease_over():
            assert time.monotonic() < deadline, "the lease did not run out"
            await anyio.sleep(0.05)
        tx.result = b"late"
    assert await store.begin("k", "fp", 30.0) == Begin(Outcome.COMPLETED, result=b"late")
    assert [tuple(r) for r in await sql(f"SELECT key FROM {effects}")] == [("k",)]


@pytest.mark.anyio
async def test_a_renewal_after_commit_but_before_the_context_exits_is_not_lease_lost(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    begun = await store.begin("k", "fp", 30.0)
    assert begun.outcome is Outcome.NEW and begun.token
    token = begun.token
    renewals: list[BaseException | None] = []
    real_release = release_quietly

    async def release_after_a_renewal(pool: Any, conn: Any) -> None:
        # The transaction has committed; its connection goes back to the pool next. A
        # heartbeat that renews now is what the runtime does until the context has exited.
        # (Once: the renewal's own connection comes back through here too.)
        if not renewals:
            renewals.append(None)
            try:
                await store.renew("k", token, 30.0)
            except BaseException as exc:
                renewals[0] = exc
        await real_release(pool, conn)

    monkeypatch.setattr(postgres_tx, "release_quietly", release_after_a_renewal)
    async with store.transaction("k", token, 60.0) as tx:
        tx.result = b"done"
    monkeypatch.undo()
    assert renewals == [None]
    assert await store.begin("k", "fp", 30.0) == Begin(Outcome.COMPLETED, result=b"done")


@pytest.mark.anyio
async def test_more_transactions_than_pooled_connections_queue_and_all_commit(
    table: str, anyio_backend: object
) -> None:
    # pool_max=2: one connection for transactions, one held back. Each transaction renews
    # its lease and begins another key from inside (what the heartbeat and other messages
    # do meanwhile): none of that may wait for a connection a transaction holds.
    effects = f"{table}_effects"
    await sql(f"CREATE TABLE {effects} (key text NOT NULL)")
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=2&command_timeout=5") as store:

        async def handle(n: int) -> None:
            begun = await store.begin(f"k{n}", "fp", 30.0)
            assert begun.outcome is Outcome.NEW and begun.token
            async with store.transaction(f"k{n}", begun.token, 60.0) as tx:
                await tx.connection.execute(f"INSERT INTO {effects} VALUES ($1)", f"k{n}")
                await store.renew(f"k{n}", begun.token, 30.0)
                assert (await store.begin(f"k{n}", "fp", 30.0)).outcome is Outcome.IN_PROGRESS
                tx.result = str(n).encode()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(6):
                    tg.start_soon(handle, n)
        for n in range(6):
            assert await store.begin(f"k{n}", "fp", 30.0) == Begin(
                Outcome.COMPLETED, result=str(n).encode()
            )
    assert len(await sql(f"SELECT key FROM {effects}")) == 6
