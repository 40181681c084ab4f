"""The outbox on PostgreSQL (asyncpg): row locks for claims, LISTEN/NOTIFY for wake-ups.

**Claims.** A claim is one transaction on a connection of the relay's own, held open while
the relay publishes. It takes up to ``limit`` unsent rows in id order with ``FOR UPDATE OF o
SKIP LOCKED``, so relays running side by side never take one row twice and never wait for
each other. A relay that dies drops its connection, PostgreSQL rolls the transaction back, and
the rows are free again at once (no lease to wait out).

**Per-key order.** Rows of one key must be published oldest first, one at a time, by one relay.
``SKIP LOCKED`` alone does not give that: relay A may lock rows 10 and 12 of key K while relay
B, scanning at the same moment, locks row 11. So after locking, the claim asks for the oldest
unsent row of each of its keys that it does *not* hold, and keeps only its rows older than
that one; the rest (``withheld``) stay locked, unpublished, until the transaction ends. The
oldest unsent row of a key is always publishable by whoever holds it, so every key progresses.
A row whose publish failed waits ``available_at`` out, and the scan skips every later row of
its key meanwhile, so one stuck key does not fill the batches of the others.

Order is id order: ``bigserial`` hands ids out as rows are inserted, not as they commit. Two
transactions that add rows with the same key and commit in the other order (nothing serialises
them) have no order to keep; when they are serialised (one transaction, or both lock the same
business row first, the usual case) id order is commit order and the relay keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import asyncpg.pool  # type: ignore[import-untyped, unused-ignore]

from oncely._postgres import (
    close_quietly,
    create_pool,
    mask,
    parse_postgres_url,
    release_quietly,
    rollback_quietly,
)
from oncely._postgres import map_errors as _map_errors
from oncely.errors import ConfigError, StoreError, StoreUnavailable
from oncely.stores._outbox_base import (
    MISSING_TABLE,
    Backend,
    Claim,
    Failure,
    Row,
    check_table,
    to_row,
)

__all__ = ["PgBackend"]

log = logging.getLogger("oncely.outbox")

CONNECT_TIMEOUT = 10.0
STATEMENT_TIMEOUT = 30.0
"""The longest any of the relay's own statements (or a wait for a pooled connection) may go
unanswered before it fails as ``StoreUnavailable``: a database that stops answering without
closing the connection (a frozen host, a partition) would otherwise hold the relay for as long
as the kernel keeps the socket, with no error to log or retry on."""
CLOSE_TIMEOUT = 5.0
POOL_CLOSE_TIMEOUT = 10.0
LISTEN_RETRY = (0.5, 10.0)
"""First and largest pause before the listener reconnects."""
IDLE_IN_TRANSACTION = 900.0
"""Seconds after which PostgreSQL ends a relay session that sits in a claim without a
statement (a hung relay, not a dead one: a dead one's connection drops at once), freeing its
rows. Set on the relay's own sessions, so a server or role setting does not apply."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {t} (
    id bigserial PRIMARY KEY,
    message_id text NOT NULL,
    topic text NOT NULL,
    key text,
    headers jsonb NOT NULL DEFAULT '{{}}',
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    available_at timestamptz NOT NULL DEFAULT now()
)""",
    "CREATE INDEX IF NOT EXISTS {n}_unsent ON {t} (id) WHERE sent_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {n}_unsent_key ON {t} (key, id) WHERE sent_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {n}_sent ON {t} (sent_at) WHERE sent_at IS NOT NULL",
)

# One round trip: the notification is queued in the user's transaction and delivered when it
# commits (never if it rolls back); PostgreSQL folds identical ones of a transaction into one.
_ADD = """WITH ins AS (
    INSERT INTO {t} (message_id, topic, key, headers, body) VALUES ($1, $2, $3, $4::jsonb, $5)
    RETURNING 1
) SELECT pg_notify($6, '') FROM ins"""

_SCAN = """SELECT id, message_id, topic, key, headers::text, body, attempts,
    extract(epoch FROM created_at)::float8
FROM {t} o
WHERE sent_at IS NULL AND available_at <= now()
  AND (key IS NULL OR NOT EXISTS (
      SELECT 1 FROM {t} p
      WHERE p.key = o.key AND p.sent_at IS NULL AND p.id < o.id AND p.available_at > now()))
ORDER BY id
LIMIT $1
FOR UPDATE OF o SKIP LOCKED"""

_OLDEST_NOT_MINE = """SELECT key, min(id) FROM {t}
WHERE sent_at IS NULL AND key = ANY($1::text[]) AND id <> ALL($2::bigint[])
GROUP BY key"""

# clock_timestamp(), not now(): now() is when the claim's transaction began, and it stays open
# while the batch publishes; a backoff counted from then would be cut short by that long.
_MARK_SENT = """UPDATE {t}
SET sent_at = clock_timestamp(), attempts = attempts + 1, last_error = NULL
WHERE id = ANY($1::bigint[])"""

_MARK_FAILED = """UPDATE {t} SET attempts = {t}.attempts + 1, last_error = f.error,
    available_at = clock_timestamp() + f.delay * interval '1 second'
FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, delay)
WHERE {t}.id = f.id"""

_PURGE = """WITH doomed AS (
    SELECT id FROM {t} WHERE sent_at < now() - $1 * interval '1 second'
    ORDER BY sent_at LIMIT $2 FOR UPDATE SKIP LOCKED
) DELETE FROM {t} USING doomed WHERE {t}.id = doomed.id RETURNING 1"""

_PENDING = "SELECT count(*) FROM {t} WHERE sent_at IS NULL"
_BACKLOG = (
    "SELECT count(*), extract(epoch FROM min(created_at))::float8 FROM {t} WHERE sent_at IS NULL"
)


def map_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """``oncely._postgres.map_errors`` with the outbox's precision: refused credentials and a
    missing table are ``ConfigError`` (retrying cannot help)."""
    return _map_errors(
        f"postgresql {what}",
        refused=ConfigError,
        missing_table=MISSING_TABLE,
    )


class PgBackend(Backend):
    dialect = "postgresql"
    # A claim idles while its batch publishes; one that outlives IDLE_IN_TRANSACTION loses its
    # session, marks nothing, and its batch is published again, each time alike. 3 minutes
    # kept clear for a slow loop and the statements around the publishes.
    max_claim_idle = IDLE_IN_TRANSACTION - 180.0

    def __init__(self, url: str, table: str) -> None:
        # No options of its own: only libpq's parameters pass (anything else is refused).
        self._dsn = parse_postgres_url(url, ()).dsn
        self.url = mask(url)
        self.table = check_table(table)
        self._channel = self.table
        short = self.table.rpartition(".")[2]
        self._sql = {
            name: sql.format(t=self.table, n=short)
            for name, sql in {
                "add": _ADD,
                "scan": _SCAN,
                "others": _OLDEST_NOT_MINE,
                "sent": _MARK_SENT,
                "failed": _MARK_FAILED,
                "purge": _PURGE,
                "pending": _PENDING,
                "backlog": _BACKLOG,
            }.items()
        }
        self._schema = [s.format(t=self.table, n=short) for s in _SCHEMA]
        self._pool: asyncpg.Pool | None = None
        self._lock: asyncio.Lock | None = None
        self.listening = False
        """True while the LISTEN connection is up (polling covers the gaps)."""

    @property
    def connected(self) -> bool:
        return self._pool is not None

    def schema(self) -> list[str]:
        return list(self._schema)

    async def _connect_one(self) -> asyncpg.Connection:
        with map_errors("connect"):
            conn: asyncpg.Connection = await asyncpg.connect(
                self._dsn, timeout=CONNECT_TIMEOUT, server_settings=_settings()
            )
        return conn

    async def connect(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                # Two connections: the claim loop and the retention sweep.
                self._pool = await create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=2,
                    connect_timeout=CONNECT_TIMEOUT,
                    server_settings=_settings(),
                    what="postgresql connect",
                    refused=ConfigError,
                )
        await self.migrate()

    async def migrate(self) -> None:
        conn = await self._connect_one()
        try:
            with map_errors("migrate"):
                async with conn.transaction():
                    # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog.
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('oncely_outbox'))")
                    for statement in self._schema:
                        await conn.execute(statement)
        finally:
            await close_quietly(conn, CLOSE_TIMEOUT)

    async def add(
        self,
        conn: Any,
        *,
        message_id: str,
        topic: str,
        key: str | None,
        headers: str,
        body: bytes,
    ) -> None:
        if not isinstance(conn, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
            raise TypeError(
                "a postgresql outbox adds through an asyncpg connection (the one your "
                f"transaction runs on), got {type(conn).__name__}"
            )
        with map_errors("outbox add"):
            await conn.execute(
                self._sql["add"], message_id, topic, key, headers, body, self._channel
            )

    def _ready(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the outbox is not connected; call connect() first")
        return self._pool

    async def claim(self, limit: int, lease: float) -> Claim:
        pool = self._ready()
        limit_s = STATEMENT_TIMEOUT
        with map_errors("claim"):
            conn: asyncpg.Connection = await pool.acquire(timeout=limit_s)
        tx = conn.transaction()
        try:
            with map_errors("claim"):
                async with asyncio.timeout(limit_s):  # BEGIN takes no timeout of its own
                    await tx.start()
                records = await conn.fetch(self._sql["scan"], limit, timeout=limit_s)
                rows = [to_row(r) for r in records]
                keys = sorted({r.key for r in rows if r.key is not None})
                oldest: dict[str, int] = {}
                if keys:
                    ids = [r.id for r in rows]
                    others = await conn.fetch(self._sql["others"], keys, ids, timeout=limit_s)
                    oldest = {k: i for k, i in others}
        except BaseException:
            await asyncio.shield(_end(pool, conn, tx))
            raise
        kept = [r for r in rows if r.key is None or r.key not in oldest or r.id < oldest[r.key]]
        return PgClaim(self, pool, conn, tx, kept, len(rows) - len(kept))

    async def _fetch(self, what: str, *args: Any) -> list[Any]:
        """One statement on a pooled connection, all of it bounded by ``STATEMENT_TIMEOUT``:
        the wait for the connection, the statement, and giving it back (the pool's own
        ``fetch`` gives it back with no bound, and after a statement timed out that waits for
        a cancel request the server may never answer: the connection would be lost to the
        pool for good, and with both lost the relay could not claim again)."""
        pool = self._ready()
        with map_errors(what):
            async with pool.acquire(timeout=STATEMENT_TIMEOUT) as conn:
                rows: list[Any] = await conn.fetch(
                    self._sql[what], *args, timeout=STATEMENT_TIMEOUT
                )
        return rows

    async def purge(self, older_than: float, limit: int) -> int:
        return len(await self._fetch("purge", older_than, limit))

    async def pending(self) -> int:
        rows = await self._fetch("pending")
        return int(rows[0][0])

    async def backlog(self) -> tuple[int, float | None]:
        rows = await self._fetch("backlog")
        return int(rows[0][0]), rows[0][1]

    async def listen(self, wake: Callable[[], None]) -> None:
        pause = LISTEN_RETRY[0]
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect_one()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                with map_errors("listen"):
                    await conn.add_listener(self._channel, lambda *_a: wake())
                self.listening = True
                # Whatever was added while nobody listened is found by this look.
                wake()
                pause = LISTEN_RETRY[0]
                await lost.wait()
                self.listening = False
                log.warning("outbox listener connection to %s closed; reconnecting", self.url)
            except (StoreUnavailable, StoreError) as exc:
                log.warning("outbox listener on %s failed (%s); polling meanwhile", self.url, exc)
            finally:
                self.listening = False
                if conn is not None:
                    await asyncio.shield(close_quietly(conn, CLOSE_TIMEOUT))
            await asyncio.sleep(pause)
            pause = min(pause * 2, LISTEN_RETRY[1])

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_quietly(pool, POOL_CLOSE_TIMEOUT)


class PgClaim(Claim):
    def __init__(
        self,
        backend: PgBackend,
        pool: asyncpg.Pool,
        conn: asyncpg.Connection,
        tx: Any,
        rows: list[Row],
        withheld: int,
    ) -> None:
        self._backend = backend
        self._pool = pool
        self._conn = conn
        self._tx = tx
        self.rows = rows
        self.withheld = withheld
        self._done = False

    async def finish(self, sent: list[int], failed: list[Failure]) -> None:
        if self._done:
            return
        self._done = True
        sql = self._backend._sql
        limit = STATEMENT_TIMEOUT
        ok = False
        try:
            with map_errors("mark sent"):
                if sent:
                    await self._conn.execute(sql["sent"], sent, timeout=limit)
                if failed:
                    await self._conn.execute(
                        sql["failed"],
                        [f.id for f in failed],
                        [f.error for f in failed],
                        [f.delay for f in failed],
                        timeout=limit,
                    )
                # COMMIT takes no timeout of its own. One that times out has an unknown
                # outcome, like a lost connection: rows not marked are published again.
                async with asyncio.timeout(limit):
                    await self._tx.commit()
            ok = True
        finally:
            await asyncio.shield(_end(self._pool, self._conn, self._tx, done=ok))

    async def abandon(self) -> None:
        if self._done:
            return
        self._done = True
        await asyncio.shield(_end(self._pool, self._conn, self._tx))


def _settings() -> dict[str, str]:
    # The pid lets an operator (and the tests) find a relay's sessions in pg_stat_activity.
    return {
        "application_name": f"oncely-outbox-relay:{os.getpid()}",
        "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION:.0f}s",
    }


async def _end(
    pool: asyncpg.Pool, conn: asyncpg.Connection, tx: Any, *, done: bool = False
) -> None:
    """Roll back (unless already done) and give the connection back; never raises. A
    connection whose rollback failed is closed rather than reused."""
    if not done:
        await rollback_quietly(conn, tx, STATEMENT_TIMEOUT)
    await release_quietly(pool, conn)
