"""The outbox on SQLite (aiosqlite), for applications on the embedded default.

**Claims.** SQLite has no row locks, so a claim is a lease: one ``UPDATE ... RETURNING``
statement stamps up to ``limit`` rows with a claim token and a lease deadline. SQLite takes its
one write lock before the statement reads, so two relays (tasks or processes) never claim one
row. Marks are guarded by the token; a relay that dies leaves its rows leased until the
deadline passes, then another relay takes them (and publishes them again: the same message
ids, so the consumer's store absorbs the duplicates). Nobody renews a lease: instead the relay
starts no publish after half of it (``OutboxRelay.lease``, at least 4 publish timeouts) and
releases the rows it did not reach, so a slow batch is never claimed again while still being
published.

**Per-key order** is decided inside the claim statement: a row is claimable only if no older
unsent row of its key is leased (held by a relay, or waiting out a failed publish's backoff).
Older free rows of the key come earlier in id order, so the claim takes them first. A failed
row keeps a lease for its backoff, which blocks the rest of its key and nothing else.

Times are wall-clock (``time.time()``), since processes share the file. SQLite serialises
writers: a claim waits for the write lock while an application transaction that added a row
is still open, and proceeds as soon as it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiosqlite

from oncely._sqlite import immediate, map_sqlite_errors, open_db, parse_sqlite_url, reject_unknown
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

__all__ = ["SqliteBackend"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {t} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    key TEXT,
    headers TEXT NOT NULL DEFAULT '{{}}',
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_until REAL,
    claim_token TEXT
)""",
    "CREATE INDEX IF NOT EXISTS {t}_unsent ON {t} (id) WHERE sent_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {t}_unsent_key ON {t} (key, id) WHERE sent_at IS NULL",
    "CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE sent_at IS NOT NULL",
)

_ADD = (
    "INSERT INTO {t} (message_id, topic, key, headers, body, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)

_CLAIM = """UPDATE {t} SET claim_token = ?1, lease_until = ?2
WHERE id IN (
    SELECT o.id FROM {t} o
    WHERE o.sent_at IS NULL AND (o.lease_until IS NULL OR o.lease_until <= ?3)
      AND (o.key IS NULL OR NOT EXISTS (
          SELECT 1 FROM {t} p
          WHERE p.key = o.key AND p.sent_at IS NULL AND p.id < o.id AND p.lease_until > ?3))
    ORDER BY o.id
    LIMIT ?4
)
RETURNING id, message_id, topic, key, headers, body, attempts, created_at"""

_MARK_SENT = """UPDATE {t}
SET sent_at = ?, attempts = attempts + 1, last_error = NULL, lease_until = NULL,
    claim_token = NULL
WHERE claim_token = ? AND id IN ({marks})"""

_MARK_FAILED = """UPDATE {t}
SET attempts = attempts + 1, last_error = ?, lease_until = ?, claim_token = NULL
WHERE id = ? AND claim_token = ?"""

_RELEASE = "UPDATE {t} SET lease_until = NULL, claim_token = NULL WHERE claim_token = ?"

_PURGE = """DELETE FROM {t} WHERE id IN (
    SELECT id FROM {t} WHERE sent_at IS NOT NULL AND sent_at < ? LIMIT ?)"""

_PENDING = "SELECT count(*) FROM {t} WHERE sent_at IS NULL"
_BACKLOG = "SELECT count(*), min(created_at) FROM {t} WHERE sent_at IS NULL"

_MARK_CHUNK = 500
"""Ids per mark statement, well under SQLite's parameter limit."""

# Relays in this process, by (database file, table), woken at once by an add: cross-process
# relays poll.
_local: dict[tuple[str, str], set[tuple[asyncio.AbstractEventLoop, Callable[[], None]]]] = {}


class SqliteBackend(Backend):
    dialect = "sqlite"

    def __init__(self, url: str, table: str) -> None:
        self.path, options = parse_sqlite_url(url)
        reject_unknown(options, url, ())
        self.url = url
        self.table = check_table(table)
        if "." in table:
            raise ConfigError(f"a sqlite outbox table takes no schema: {table!r}")
        self._sql = {
            name: sql.format(t=table, marks="{marks}")
            for name, sql in {
                "add": _ADD,
                "claim": _CLAIM,
                "sent": _MARK_SENT,
                "failed": _MARK_FAILED,
                "release": _RELEASE,
                "purge": _PURGE,
                "pending": _PENDING,
                "backlog": _BACKLOG,
            }.items()
        }
        self._schema = [s.format(t=table) for s in _SCHEMA]
        self._db: aiosqlite.Connection | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def connected(self) -> bool:
        return self._db is not None

    def schema(self) -> list[str]:
        return list(self._schema)

    def _where(self) -> tuple[str, str]:
        return (str(self.path.resolve()), self.table)

    async def connect(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._db is None:
            self._db = await open_db(self.path)
        await self.migrate()

    async def migrate(self) -> None:
        db = self._db if self._db is not None else await open_db(self.path)
        lock = self._lock if self._db is not None and self._lock is not None else asyncio.Lock()
        try:
            with map_sqlite_errors(StoreUnavailable):
                async with immediate(db, lock):
                    for statement in self._schema:
                        await db.execute(statement)
        finally:
            if db is not self._db:
                await db.close()

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
        if not isinstance(conn, aiosqlite.Connection):
            raise TypeError(
                "a sqlite outbox adds through an aiosqlite connection (the one your "
                f"transaction runs on), got {type(conn).__name__}"
            )
        with map_sqlite_errors(
            StoreUnavailable,
            other=StoreError,
            what="sqlite outbox add",
            missing_table=MISSING_TABLE,
        ):
            await conn.execute(
                self._sql["add"], (message_id, topic, key, headers, body, time.time())
            )
        # Before the commit: a woken relay's claim waits for the write lock this transaction
        # holds, and sees the row once it commits.
        for loop, wake in list(_local.get(self._where(), ())):
            if loop is asyncio.get_running_loop():
                wake()
            else:
                loop.call_soon_threadsafe(wake)

    def _ready(self) -> tuple[aiosqlite.Connection, asyncio.Lock]:
        if self._db is None or self._lock is None:
            raise StoreUnavailable("the outbox is not connected; call connect() first")
        return self._db, self._lock

    async def claim(self, limit: int, lease: float) -> Claim:
        db, lock = self._ready()
        token = uuid.uuid4().hex
        now = time.time()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                records = await db.execute_fetchall(
                    self._sql["claim"], (token, now + lease, now, limit)
                )
        rows = sorted((to_row(r) for r in records), key=lambda r: r.id)
        return SqliteClaim(self, token, rows)

    async def purge(self, older_than: float, limit: int) -> int:
        db, lock = self._ready()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                cursor = await db.execute(self._sql["purge"], (time.time() - older_than, limit))
                return cursor.rowcount

    async def pending(self) -> int:
        db, lock = self._ready()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                rows = list(await db.execute_fetchall(self._sql["pending"]))
        return int(rows[0][0])

    async def backlog(self) -> tuple[int, float | None]:
        db, lock = self._ready()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                rows = list(await db.execute_fetchall(self._sql["backlog"]))
        count, oldest = rows[0]
        return int(count), None if oldest is None else float(oldest)

    async def listen(self, wake: Callable[[], None]) -> None:
        entry = (asyncio.get_running_loop(), wake)
        waiters = _local.setdefault(self._where(), set())
        waiters.add(entry)
        try:
            await asyncio.Event().wait()
        finally:
            waiters.discard(entry)

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                await db.close()


class SqliteClaim(Claim):
    def __init__(self, backend: SqliteBackend, token: str, rows: list[Row]) -> None:
        self._backend = backend
        self._token = token
        self.rows = rows
        self.withheld = 0
        self._done = not rows

    async def finish(self, sent: list[int], failed: list[Failure]) -> None:
        if self._done:
            return
        self._done = True
        db, lock = self._backend._ready()
        sql = self._backend._sql
        now = time.time()
        with map_sqlite_errors(StoreUnavailable):
            async with immediate(db, lock):
                for i in range(0, len(sent), _MARK_CHUNK):
                    chunk = sent[i : i + _MARK_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    await db.execute(sql["sent"].format(marks=marks), (now, self._token, *chunk))
                if failed:
                    await db.executemany(
                        sql["failed"],
                        [(f.error, now + f.delay, f.id, self._token) for f in failed],
                    )
                await db.execute(sql["release"], (self._token,))

    async def abandon(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            db, lock = self._backend._ready()
            async with lock:
                await asyncio.shield(db.execute(self._backend._sql["release"], (self._token,)))
