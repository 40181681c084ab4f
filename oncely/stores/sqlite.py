"""An idempotency store in a SQLite file, shared by every process that opens the file.

``sqlite:///state.db`` (relative) or ``sqlite:////var/lib/state.db`` (absolute), with options
``pool`` (connections for transactions, default 1) and ``purge_interval`` (seconds between
opportunistic purges of expired rows, default 60).

Every transition is a single statement, or runs under ``BEGIN IMMEDIATE`` in a transaction.
Either way SQLite takes its single write lock before the transition reads anything, so a
transition is atomic across processes. ``begin`` and ``complete`` calls that arrive together
share one statement (``oncely.stores._sqlite_keys``). Expiry uses the wall clock
(``time.time()``), since processes share the file.

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
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import aiosqlite

from oncely._batch import GroupCommit
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
from oncely.errors import ConfigError, LeaseLost, Reject, StoreError, StoreUnavailable
from oncely.stores._key_batch import BeginCall, CompleteCall, new_call
from oncely.stores._sqlite_keys import (
    BATCH,
    COMPLETE,
    OWNED,
    PURGE,
    PURGE_SOME,
    RELEASE,
    RENEW,
    SCHEMA,
    write_begins,
    write_completes,
)
from oncely.stores.base import TRANSACTION_ENDED, Begin, StoreTransaction, TransactionalStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["SqliteStore"]

STALE_LEASE_GRACE = 3600.0
"""Seconds after a lease expired (and nobody took the key) before its row may be purged.

Until then the old owner may still renew or complete; afterwards it gets ``LeaseLost``.
"""

PURGE_BATCH = 500
"""Rows an opportunistic purge deletes at most, so one ``begin`` never pays for a backlog."""

# (database file, task) for each transaction open in this context. A store call from the task
# that opened one would wait for the write lock its own transaction holds. Tasks it starts
# inherit the context but are not flagged: they only wait, which is fine unless the
# transaction awaits them, and that cannot be told from here.
_in_transaction: contextvars.ContextVar[frozenset[tuple[str, asyncio.Task[Any] | None]]] = (
    contextvars.ContextVar("oncely_sqlite_in_transaction", default=frozenset())
)


class _Ended:
    """What ``StoreTransaction.connection`` becomes once the transaction is over: any use
    raises (as asyncpg's pooled connection does once released)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"connection.{name}: the handler's transaction has ended; its connection serves "
            "other transactions now (was it used from a task the handler left running?)"
        )


class SqliteStore(TransactionalStore):
    """Keys, leases and results in the ``oncely_idempotency`` table of a SQLite file.

    One connection (guarded by an ``asyncio.Lock``, since aiosqlite runs every task's
    statements on that connection's one thread) serves ``begin``/``renew``/``complete``/
    ``release``. Concurrent ``begin`` calls share one statement, and so do concurrent
    ``complete`` calls, each caller still with its own outcome. Transactions get connections of
    their own from a pool of ``pool``, opened on first use: an open transaction must never
    see another task's statements, and the plain calls must not land inside it. A pooled
    connection is checked out by one transaction at a time, which is the lock that guards it.
    Since ``BEGIN IMMEDIATE`` takes the file's single write lock, ``pool > 1`` only helps
    handlers that spend part of their transaction reading.

    A lease that expired but was not taken over still belongs to its token: ``renew`` and
    ``complete`` succeed, until ``STALE_LEASE_GRACE`` later the row may be purged.

    Args:
        path: the database file; its directory is created on ``connect``.
        pool: how many transactions may be open at once in this process.
        purge_interval: seconds between opportunistic purges (run inside ``begin``).
    """

    complete_on_caller: ClassVar[bool] = True  # group-committed on its own task

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
        self._begins = GroupCommit(self._write_begins, limit=BATCH, abandoned=self._give_back)
        self._completes = GroupCommit(self._write_completes, limit=BATCH)
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
        reject_unknown(options, url, ("pool", "purge_interval"))
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
                        for statement in SCHEMA:
                            await db.execute(statement)
                self._ident = str(self.path.resolve())
            except BaseException:
                await _close_quietly(db)
                raise
            self._db, self._lock = db, asyncio.Lock()
            self._slots = asyncio.Semaphore(self.pool)

    async def aclose(self) -> None:
        # Calls already queued still get their outcomes; the connection goes after them.
        await self._begins.drain()
        await self._completes.drain()
        conns = [*self._tx_conns, self._db]
        self._db, self._lock, self._slots = None, None, None
        self._tx_conns, self._idle = [], []
        self._in_tx.clear()
        for db in conns:
            if db is not None:
                await _close_quietly(db)

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        self._plain()  # fail before queueing
        return await self._begins.submit(new_call(BeginCall, (key, fingerprint, lease)))

    async def renew(self, key: str, token: str, lease: float) -> None:
        if self._in_tx[key, token]:
            # The runtime's heartbeat renews transactional leases too. A transaction of
            # this process is waiting for, or holds, SQLite's write lock on behalf of this
            # key. A renew needs that same lock: it would only wait on the plain connection
            # (blocking every other plain call of the process) until the transaction ends,
            # or fail at the busy timeout. Skipping loses nothing and is safe. While the
            # transaction waits for the lock, no renew could progress either. Once it holds
            # the lock it has checked the token, and no connection of any process can write
            # the row, so no one can take the key over. If the lease ran out before that, the
            # transaction raises LeaseLost and nothing is written. In the end the key is
            # completed, or the transaction rolled back and the heartbeat's next renew pushes
            # the lease out as usual.
            return
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                now = time.time()
                changed = await _changes(
                    db, RENEW, (now + lease, now + lease + STALE_LEASE_GRACE, key, token)
                )
        if not changed:
            raise LeaseLost(f"lease on key {key!r} is no longer held by this token")

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        self._plain()
        await self._completes.submit(new_call(CompleteCall, (key, token, result, ttl)))

    async def release(self, key: str, token: str) -> None:
        db, lock = self._plain()
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                await db.execute(RELEASE, (key, token))

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
                return await _changes(db, PURGE, (time.time(),))

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
        # Counted only once a connection is ours: while a transaction waits for a pooled
        # connection it holds no lock, and the heartbeat's renewals must go through.
        db = await self._checkout()
        self._in_tx[key, token] += 1
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
                    owned = list(await db.execute_fetchall(OWNED, (key, token)))
                if not owned:
                    raise LeaseLost(f"lease on key {key!r} is no longer held by this token")
                tx = StoreTransaction(db)
                outer = _in_transaction.get()
                _in_transaction.set(outer | {(self._ident, asyncio.current_task())})
                try:
                    yield tx
                finally:
                    _in_transaction.set(outer)
                    # The connection goes back to the pool: a task the handler left running
                    # with its ctx would otherwise write into another message's transaction.
                    tx.connection = _Ended()
                if not db.in_transaction:
                    raise Reject(TRANSACTION_ENDED)  # the completion would commit on its own
                with map_sqlite_errors(StoreUnavailable):
                    args = (tx.result, time.time() + ttl, key, token)
                    if not await _changes(db, COMPLETE, args):
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

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """One statement under the connection lock. It is its own transaction, and fetching
        all its rows in one call ends it, so a cancelled caller leaves none open."""
        db, lock = self._db, self._lock
        if db is None or lock is None:
            raise StoreUnavailable("sqlite store is not connected (call connect() first)")
        with map_sqlite_errors(StoreUnavailable):
            async with lock:
                return list(await db.execute_fetchall(sql, params))

    async def _write_begins(self, calls: list[BeginCall]) -> list[Begin | Exception]:
        now = time.time()
        if now >= self._next_purge:
            # A statement of its own: it need not be atomic with the claims, and its failure
            # is not theirs (the next purge catches up).
            self._next_purge = now + self.purge_interval
            with contextlib.suppress(StoreUnavailable):
                await self._fetch(PURGE_SOME, (now, PURGE_BATCH))
        return await write_begins(self._fetch, calls, STALE_LEASE_GRACE)

    async def _write_completes(self, calls: list[CompleteCall]) -> list[Exception | None]:
        return await write_completes(self._fetch, calls)

    async def _give_back(self, call: BeginCall, begun: Begin) -> None:
        """Release a key a cancelled ``begin`` took: its caller will never use or release the
        lease, which would otherwise block the key until it runs out."""
        if begun.token is not None and self._db is not None:
            with contextlib.suppress(StoreError):
                await self.release(call.key, begun.token)

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


async def _changes(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...]) -> int:
    async with db.execute(sql, args) as cursor:
        return cursor.rowcount


async def _close_quietly(db: aiosqlite.Connection) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.close()
