"""An idempotency store in a SQLite file, shared by every process that opens the file.

``sqlite:///state.db`` (relative) or ``sqlite:////var/lib/state.db`` (absolute), with options
``pool`` (connections for transactions, default 1) and ``purge_interval`` (seconds between
opportunistic purges of expired rows, default 60).

Every read-modify-write runs under ``BEGIN IMMEDIATE``, which takes SQLite's single write lock
up front, so a transition is atomic across processes; single-statement updates are atomic on
their own. Expiry uses the wall clock (``time.time()``), since processes share the file.

Transactional mode: when the handler's own tables live in the same file, ``transaction()``
commits the handler's writes and the completion record in one SQLite transaction. SQLite
serialises writers, and the transaction holds the write lock from its first statement to its
commit, so every other writer of the file (in any process) waits meanwhile: keep transactional
handlers short, and keep slow work (HTTP calls, big reads) outside them. A writer waits at most
``BUSY_TIMEOUT_MS`` for the lock, then its call raises ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from oncely._sqlite import (
    begin_immediate,
    immediate,
    map_sqlite_errors,
    open_db,
    option,
    parse_sqlite_url,
    reject_unknown,
    rollback_quietly,
)
from oncely.runtime.errors import ConfigError, LeaseLost, StoreUnavailable
from oncely.stores.base import Begin, Outcome, StoreTransaction, TransactionalStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["SqliteStore"]

STALE_LEASE_GRACE = 3600.0
"""Seconds after a lease expired (and nobody took the key) before its row may be purged.

Until then the old owner may still renew or complete; afterwards it gets ``LeaseLost``.
"""

PURGE_BATCH = 500
"""Rows an opportunistic purge deletes at most, so one ``begin`` never pays for a backlog."""

# ``expires_at`` is when a row may be deleted: a completed row's result ttl, or a running row's
# lease plus STALE_LEASE_GRACE. One indexed column keeps the purge a range delete.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS oncely_idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'completed')),
        token TEXT,
        lease_until REAL,
        result BLOB,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS oncely_idempotency_expiry ON oncely_idempotency (expires_at)",
)
_SELECT = (
    "SELECT fingerprint, state, lease_until, result, expires_at FROM oncely_idempotency "
    "WHERE key = ?"
)
_CLAIM = (
    "INSERT OR REPLACE INTO oncely_idempotency "
    "(key, fingerprint, state, token, lease_until, result, expires_at) "
    "VALUES (?, ?, 'running', ?, ?, NULL, ?)"
)
_RENEW = (
    "UPDATE oncely_idempotency SET lease_until = ?, expires_at = ? "
    "WHERE key = ? AND token = ? AND state = 'running'"
)
_COMPLETE = (
    "UPDATE oncely_idempotency "
    "SET state = 'completed', token = NULL, lease_until = NULL, result = ?, expires_at = ? "
    "WHERE key = ? AND token = ? AND state = 'running'"
)
_OWNED = "SELECT 1 FROM oncely_idempotency WHERE key = ? AND token = ? AND state = 'running'"
_RELEASE = "DELETE FROM oncely_idempotency WHERE key = ? AND token = ? AND state = 'running'"
_PURGE = "DELETE FROM oncely_idempotency WHERE expires_at <= ?"
_PURGE_SOME = (
    "DELETE FROM oncely_idempotency WHERE rowid IN "
    "(SELECT rowid FROM oncely_idempotency WHERE expires_at <= ? LIMIT ?)"
)

# (database file, task) for each transaction open in this context. A store call from the task
# that opened one would wait for the write lock its own transaction holds. Tasks it starts
# inherit the context but are not flagged: they only wait, which is fine unless the
# transaction awaits them, and that cannot be told from here.
_in_transaction: contextvars.ContextVar[frozenset[tuple[str, asyncio.Task[Any] | None]]] = (
    contextvars.ContextVar("oncely_sqlite_in_transaction", default=frozenset())
)


class SqliteStore(TransactionalStore):
    """Keys, leases and results in the ``oncely_idempotency`` table of a SQLite file.

    One connection (guarded by an ``asyncio.Lock``, since aiosqlite runs every task's
    statements on that connection's one thread) serves ``begin``/``renew``/``complete``/
    ``release``. Transactions get connections of their own from a pool of ``pool``, opened on
    first use: an open transaction must never see another task's statements, and the plain
    calls must not land inside it. A pooled connection is checked out by one transaction at a
    time, which is the lock that guards it. Since ``BEGIN IMMEDIATE`` takes the file's single
    write lock, ``pool > 1`` only helps handlers that spend part of their transaction reading.

    A lease that expired but was not taken over still belongs to its token: ``renew`` and
    ``complete`` succeed, until ``STALE_LEASE_GRACE`` later the row may be purged.

    Args:
        path: the database file; its directory is created on ``connect``.
        pool: how many transactions may be open at once in this process.
        purge_interval: seconds between opportunistic purges (run inside ``begin``).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, pool: int = 1, purge_interval: float = 60.0
    ) -> None:
        if pool < 1:
            raise ConfigError(f"pool must be >= 1, got {pool}")
        if purge_interval <= 0:
            raise ConfigError(f"purge_interval must be > 0, got {purge_interval}")
        self.path = Path(path)
        self.pool = pool
        self.purge_interval = purge_interval
        query = "&".join(
            f"{name}={value}"
            for name, value, default in (("pool", pool, 1), ("purge_interval", purge_interval, 60))
            if value != default
        )
        self.url = f"sqlite:///{self.path}" + (f"?{query}" if query else "")
        self._db: aiosqlite.Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._connecting: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[aiosqlite.Connection] = []
        self._tx_conns: list[aiosqlite.Connection] = []
        self._in_tx: Counter[tuple[str, str]] = Counter()
        self._ident = ""
        self._next_purge = 0.0

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """Build a store from ``sqlite:///path.db?pool=N&purge_interval=S``.

        Raises:
            ConfigError: the URL names no file, has a host, or has a bad or unknown option.
        """
        path, options = parse_sqlite_url(url)
        raw_pool = options.pop("pool", "1")
        if not raw_pool.isdigit() or int(raw_pool) < 1:
            raise ConfigError(f"{url!r}: option pool={raw_pool!r} must be a whole number >= 1")
        purge_interval = option(options, "purge_interval", 60.0, url)
        reject_unknown(options, url)
        store = cls(path, pool=int(raw_pool), purge_interval=purge_interval)
        store.url = url
        return store

    async def connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._db is not None:
                return
            db = await self._open()
            try:
                with map_sqlite_errors(StoreUnavailable):
                    async with immediate(db, asyncio.Lock()):
                        for statement in _SCHEMA:
                            await db.execute(statement)
                self._ident = str(self.path.resolve())
            except BaseException:
                await _close_quietly(db)
                raise
            self._db, self._lock = db, asyncio.Lock()
            self._slots = asyncio.Semaphore(self.pool)

    async def aclose(self) -> None:
        conns = [*self._tx_conns, self._db]
        self._db, self._lock, self._slots = None, None, None
        self._tx_conns, self._idle = [], []
        self._in_tx.clear()
        for db in conns:
            if db is not None:
                await _close_quietly(db)

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with immediate(db, lock):
                now = time.time()
                if now >= self._next_purge:
                    self._next_purge = now + self.purge_interval
                    await db.execute(_PURGE_SOME, (now, PURGE_BATCH))
                rows = list(await db.execute_fetchall(_SELECT, (key,)))
                if rows:
                    found = _classify(rows[0], fingerprint, now)
                    if found is not None:
                        return found
                token = uuid.uuid4().hex
                until = now + lease
                await db.execute(
                    _CLAIM, (key, fingerprint, token, until, until + STALE_LEASE_GRACE)
                )
        return Begin(Outcome.NEW, token=token)

    async def renew(self, key: str, token: str, lease: float) -> None:
        if self._in_tx[key, token]:
            # A transaction of this process is waiting for, or holds, SQLite's write lock on
            # behalf of this key. A renew needs that same lock: it would only wait on the
            # plain connection (blocking every other plain call of the process) until the
            # transaction ends, or fail at the busy timeout. Skipping loses nothing and is
            # safe. While the transaction waits for the lock, no renew could progress either.
            # Once it holds the lock it has checked the token, and no connection of any
            # process can write the row, so no one can take the key over. If the lease ran
            # out before that, the transaction raises LeaseLost and nothing is written. In
            # the end the key is completed, or the transaction rolled back and the
            # heartbeat's next renew pushes the lease out as usual.
            return
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                now = time.time()
                changed = await _changes(
                    db, _RENEW, (now + lease, now + lease + STALE_LEASE_GRACE, key, token)
                )
        if not changed:
            raise LeaseLost(f"lease on key {key!r} is no longer held by this token")

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                changed = await _changes(db, _COMPLETE, (result, time.time() + ttl, key, token))
        if not changed:
            raise LeaseLost(f"lease on key {key!r} is no longer held by this token")

    async def release(self, key: str, token: str) -> None:
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                await db.execute(_RELEASE, (key, token))

    async def purge(self) -> int:
        """Delete expired results and long-dead leases now.

        Returns:
            How many rows were deleted.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                return await _changes(db, _PURGE, (time.time(),))

    @contextlib.asynccontextmanager
    async def transaction(
        self, key: str, token: str, ttl: float
    ) -> AsyncIterator[StoreTransaction]:
        """See ``TransactionalStore.transaction``.

        The owner is checked right after ``BEGIN IMMEDIATE``: if ``token`` lost the key
        before the transaction could start, ``LeaseLost`` is raised on entry and the body
        never runs. From then on the transaction holds the write lock, so the lease cannot be
        taken over; the completion is still guarded by the token. On any exception the
        transaction rolls back and the lease stays with ``token`` (the caller releases it or
        lets it expire); the handler's own database errors propagate unchanged.

        Raises:
            LeaseLost: ``token`` does not own the key; nothing was written.
            StoreUnavailable: the store could not be reached.
            RuntimeError: this task already has a transaction open on this file (so do
                ``begin``/``renew``/``complete``/``release`` called from inside one).
        """
        self._check_not_nested()
        self._in_tx[key, token] += 1
        try:
            db = await self._checkout()
        except BaseException:
            self._untrack(key, token)
            raise
        try:
            # A renew of this key that passed the check above before we counted it may be
            # on the plain connection; let it finish, or it could lose the race for the
            # write lock to our BEGIN and then wait out the whole transaction.
            if self._lock is not None:
                async with self._lock:
                    pass
            with map_sqlite_errors(StoreUnavailable):
                await begin_immediate(db)
            try:
                with map_sqlite_errors(StoreUnavailable):
                    owned = list(await db.execute_fetchall(_OWNED, (key, token)))
                if not owned:
                    raise LeaseLost(f"lease on key {key!r} is no longer held by this token")
                tx = StoreTransaction(db)
                outer = _in_transaction.get()
                _in_transaction.set(outer | {(self._ident, asyncio.current_task())})
                try:
                    yield tx
                finally:
                    _in_transaction.set(outer)
                with map_sqlite_errors(StoreUnavailable):
                    args = (tx.result, time.time() + ttl, key, token)
                    if not await _changes(db, _COMPLETE, args):
                        raise LeaseLost(f"lease on key {key!r} was lost during the transaction")
                    await asyncio.shield(db.execute("COMMIT"))
            except BaseException:
                await asyncio.shield(rollback_quietly(db))
                raise
        finally:
            self._untrack(key, token)
            self._checkin(db)

    async def _open(self) -> aiosqlite.Connection:
        try:
            return await open_db(self.path)
        except OSError as exc:  # open_db creates the directory before sqlite has a say
            raise StoreUnavailable(f"sqlite: cannot open {str(self.path)!r}: {exc}") from exc

    def _plain(self) -> tuple[aiosqlite.Connection, asyncio.Lock]:
        if self._db is None or self._lock is None:
            raise StoreUnavailable("sqlite store is not connected (call connect() first)")
        self._check_not_nested()
        return self._db, self._lock

    def _check_not_nested(self) -> None:
        # Fail at once rather than wait out the busy timeout on our own write lock.
        if (self._ident, asyncio.current_task()) in _in_transaction.get():
            raise RuntimeError(
                f"a store transaction on {self._ident!r} is open in this task; this call "
                "would wait for its own write lock. Use tx.connection inside the "
                "transaction and call the store after it ends"
            )

    async def _checkout(self) -> aiosqlite.Connection:
        slots = self._slots
        if slots is None:
            raise StoreUnavailable("sqlite store is not connected (call connect() first)")
        await slots.acquire()
        try:
            if self._idle:
                return self._idle.pop()
            db = await self._open()
            self._tx_conns.append(db)
            return db
        except BaseException:
            slots.release()
            raise

    def _untrack(self, key: str, token: str) -> None:
        self._in_tx[key, token] -= 1
        if self._in_tx[key, token] <= 0:
            del self._in_tx[key, token]

    def _checkin(self, db: aiosqlite.Connection) -> None:
        if self._slots is not None and db in self._tx_conns:  # else closed meanwhile
            self._idle.append(db)
            self._slots.release()


def _classify(row: Any, fingerprint: str, now: float) -> Begin | None:
    """The outcome for an existing row, or ``None`` if it expired and may be taken."""
    found_fingerprint, state, lease_until, result, expires_at = row
    if state == "completed":
        if expires_at <= now:
            return None
        if found_fingerprint != fingerprint:
            return Begin(Outcome.MISMATCH)
        return Begin(Outcome.COMPLETED, result=None if result is None else bytes(result))
    if lease_until <= now:
        return None
    if found_fingerprint != fingerprint:
        return Begin(Outcome.MISMATCH)
    return Begin(Outcome.IN_PROGRESS, retry_after=lease_until - now)


async def _changes(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...]) -> int:
    async with db.execute(sql, args) as cursor:
        return cursor.rowcount


async def _close_quietly(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.close()
