"""Connections, transactions and the table of the PostgreSQL store (``oncely.stores.postgres``).

The design of transactional mode (why one committed effect per key) is in that module's
docstring; this is its mechanics: a managed asyncpg transaction, so a handler may nest
``conn.transaction()`` (a savepoint), the token-guarded completion as its last statement, and
cleanup that leaves no connection inside a transaction or with a handler's session state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from oncely._postgres import map_errors, release_quietly, rollback_quietly, unavailable
from oncely.errors import LeaseLost, Reject, StoreError, StoreUnavailable
from oncely.stores.base import TRANSACTION_ENDED, StoreTransaction

if TYPE_CHECKING:
    from oncely.stores._postgres_sql import Sql


@contextlib.asynccontextmanager
async def acquired(pool: Any, limit: float) -> AsyncIterator[Any]:
    """A pooled connection, waited for at most ``limit`` seconds, always given back."""
    with map_errors():
        conn = await pool.acquire(timeout=limit)
    try:
        yield conn
    finally:
        await asyncio.shield(release_quietly(pool, conn))


@contextlib.asynccontextmanager
async def completing_transaction(
    pool: Any,
    complete_sql: str,
    key: str,
    token: str,
    ttl: float,
    *,
    limit: float,
    finishing: set[tuple[str, str]],
    reset: bool,
) -> AsyncIterator[StoreTransaction]:
    """Yield a transaction; on a clean exit record the completion in it and commit.

    ``limit`` bounds the wait for a connection and each of the store's own statements.
    ``(key, token)`` sits in ``finishing`` while the completion is being recorded, so a renew
    that meets the completed row meanwhile is not mistaken for a lost lease. ``reset``: run
    asyncpg's session reset before giving the connection back (the store's own pool skips it
    on release).
    """
    entry = (key, token)
    try:
        async with acquired(pool, limit) as conn:
            with map_errors():
                # READ COMMITTED whatever the database's default: the heartbeat renews the key's
                # row meanwhile, and under a snapshot older than that renewal the completion's
                # UPDATE of it would fail to serialize (40001), at every retry.
                tr = conn.transaction(isolation="read_committed")
                await tr.start()
            try:
                tx = StoreTransaction(conn)
                yield tx
                with map_errors():  # a connection the handler terminated is detached
                    ended = not conn.is_in_transaction()
                if ended:
                    # The completion would commit on its own (asyncpg tracks the server's
                    # transaction status, so this costs no round trip).
                    raise Reject(TRANSACTION_ENDED)
                finishing.add(entry)
                with map_errors():
                    status = await conn.execute(
                        complete_sql, key, token, tx.result, ttl, timeout=limit
                    )
                if status != "UPDATE 1":
                    raise LeaseLost(f"lease on key {key!r} was lost during the transaction")
                with map_errors():
                    await asyncio.shield(tr.commit())
            except BaseException as exc:
                await asyncio.shield(rollback_quietly(conn, tr, limit))
                if isinstance(exc, Exception) and lost(exc, conn):
                    # The connection is the store's: its loss is an outage of the store (a
                    # deferral that spends no attempt), not a failure of the handler, however
                    # it surfaced. The handler's other database errors propagate unchanged.
                    raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
                raise
            finally:
                if reset:
                    # The handler may have changed the session (SET, LISTEN, advisory locks).
                    await asyncio.shield(_reset_session(conn, limit))
    finally:
        # Last, with no await after it: the runtime renews the lease until this context has
        # exited, and a renewal that finds the row completed must not read as a lost lease.
        finishing.discard(entry)


def lost(exc: Exception, conn: Any) -> bool:
    """Whether ``exc`` reports that the transaction's connection went away (it is closed
    now, and the error is a connection error): a deadlock, a serialization failure or a
    statement timeout of the handler's own leaves the connection open, and stays its error."""
    if isinstance(exc, StoreError):
        return False  # ours, mapped already
    try:
        closed = bool(conn.is_closed())
    except Exception:
        closed = True  # a pool's proxy that gave up its connection: it was terminated
    return closed and unavailable(exc)


async def keep_session(conn: Any) -> None:
    """A pool ``reset`` that does nothing: the store's own statements change no session
    state, and transactions reset their connection themselves."""


async def _reset_session(conn: Any, limit: float) -> None:
    try:
        if not conn.is_closed():
            await conn.execute(conn.get_reset_query(), timeout=limit)
    except Exception:
        # A connection whose session cannot be reset must not be reused.
        with contextlib.suppress(Exception):
            conn.terminate()


async def prepare_table(
    pool: Any, sql: Sql, schema: str | None, table: str, limit: float, create: bool
) -> None:
    """Create the store's table and indexes (``create``), or check that the table exists.

    Raises:
        StoreError: ``create`` is false and the table does not exist.
        StoreUnavailable: the server could not be reached.
    """
    async with acquired(pool, limit) as conn:
        with map_errors():
            if create:
                # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog; a
                # transaction-scoped advisory lock serialises the workers that start together.
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", f"oncely:{schema}.{table}"
                    )
                    for statement in sql.schema:
                        await conn.execute(statement, timeout=limit)
            else:
                try:
                    await conn.execute(sql.exists, timeout=limit)
                except asyncpg.UndefinedTableError as exc:
                    raise StoreError(
                        f"postgres store: table {table!r} does not exist and "
                        "create_table=false; run the migration in oncely.stores.postgres"
                    ) from exc
