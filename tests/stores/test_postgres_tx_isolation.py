"""PostgreSQL transactional mode on a database whose default isolation is higher than READ
COMMITTED (``ALTER DATABASE ... SET default_transaction_isolation``, or a role's setting).

The runtime renews a transactional handler's lease on another connection while the handler
runs. Under REPEATABLE READ or SERIALIZABLE the transaction's snapshot predates that renewal,
so the completion's ``UPDATE`` of the renewed row failed with a serialization error (40001),
mapped to ``StoreUnavailable``: every handler that ran past one heartbeat never committed, and
was deferred and run again for ever, spending no attempt. The store's transaction now begins
at READ COMMITTED, as the design assumes, whatever the default.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from oncely.stores.base import Outcome
from oncely.stores.postgres import PostgresStore

URL = os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["repeatable read", "serializable"])
async def store(
    request: pytest.FixtureRequest, unique: str, anyio_backend: object
) -> AsyncIterator[PostgresStore]:
    """A store on an application pool whose sessions default to ``request.param``, as every
    session does on a database configured so."""
    table = f"oncely_{unique.replace('-', '_')}"
    pool = await asyncpg.create_pool(
        URL,
        min_size=1,
        max_size=3,
        server_settings={"default_transaction_isolation": request.param},
    )
    try:
        async with PostgresStore(pool=pool, table=table) as store:
            yield store
        async with pool.acquire() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(f"DROP TABLE IF EXISTS {table}_effects")
    finally:
        await pool.close()


async def test_a_transaction_renewed_meanwhile_commits_at_a_higher_default_isolation(
    store: PostgresStore,
) -> None:
    effects = f"{store.table}_effects"
    await store._execute(f"CREATE TABLE {effects} (key text NOT NULL)")
    begun = await store.begin("k", "fp", 30.0)
    assert begun.outcome is Outcome.NEW and begun.token is not None
    async with store.transaction("k", begun.token, 60.0) as tx:
        conn: Any = tx.connection
        await conn.execute(f"INSERT INTO {effects} VALUES ('k')")  # the snapshot is taken
        await store.renew("k", begun.token, 30.0)  # the heartbeat, on another connection
    again = await store.begin("k", "fp", 30.0)
    assert again.outcome is Outcome.COMPLETED
    rows = await store._execute(f"SELECT 1 FROM {effects}")
    assert rows == "SELECT 1"


@pytest.fixture
async def serializable_url(anyio_backend: object) -> AsyncIterator[str]:
    """The URL of a database of its own whose sessions default to SERIALIZABLE."""
    name = f"oncely_ser_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = 'serializable'"
        )
        yield URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_the_store_s_own_statements_do_not_fail_to_serialize_on_such_a_database(
    serializable_url: str,
) -> None:
    """The store's single statements were serializable transactions there too: one that
    waited for a row another session changed failed (40001) instead of reading the row anew.
    A completion failing so is retried, then logged as the crash window and acked unrecorded
    (its effect runs again on a redelivery); a begin fails closed. Three stores with 8 tasks
    each over 50 keys failed 94 calls in 4,800 so. The store's own pool now sets READ
    COMMITTED. Here: a renewal waits for a row another session updates, then commits."""
    async with PostgresStore.from_url(f"{serializable_url}?table=keys") as store:
        begun = await store.begin("k", "fp", 30.0)
        assert begun.token is not None
        other = await asyncpg.connect(serializable_url)
        try:
            async with other.transaction(isolation="read_committed"):
                await other.execute("UPDATE keys SET lease_until = lease_until WHERE key = 'k'")
                renewal = asyncio.create_task(store.renew("k", begun.token, 30.0))

                async def renewal_waits() -> bool:
                    waiting = await other.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                        "AND datname = current_database() AND wait_event_type = 'Lock'"
                    )
                    return bool(waiting)

                deadline = asyncio.get_running_loop().time() + 10
                while not await renewal_waits():
                    assert asyncio.get_running_loop().time() < deadline, "renewal never waited"
                    await asyncio.sleep(0.01)
            await renewal  # StoreUnavailable (SerializationError) before
        finally:
            await other.close()
        again = await store.begin("k", "fp", 30.0)
        assert again.outcome is Outcome.IN_PROGRESS
