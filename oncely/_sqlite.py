"""SQLite plumbing shared by the SQLite broker, store and outbox.

URLs follow SQLAlchemy's rule: ``sqlite:///jobs.db`` is relative to the working directory,
``sqlite:////var/lib/jobs.db`` is absolute. Query parameters carry backend options.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiosqlite

from oncely._options import number
from oncely.errors import ConfigError, StoreUnavailable

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another process's write lock before SQLITE_BUSY, unless the
caller of ``open_db`` chooses another timeout."""


def parse_sqlite_url(url: str) -> tuple[Path, dict[str, str]]:
    """Split ``sqlite:///path?opt=v`` into the database path and its options."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigError(f"not a sqlite URL: {url!r}")
    if parts.netloc:
        raise ConfigError(
            f"sqlite URL {url!r} has a host; write sqlite:///relative.db or sqlite:////abs.db"
        )
    if "#" in url:
        # urlsplit drops a fragment: sqlite:///jobs#2.db would open 'jobs', silently.
        raise ConfigError(f"sqlite URL {url!r} has a '#'; a file name cannot hold one here")
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not raw:
        raise ConfigError(f"sqlite URL {url!r} names no file; write sqlite:///path/to.db")
    if raw.endswith("/"):
        raise ConfigError(f"sqlite URL {url!r} names a directory; write sqlite:///{raw}name.db")
    if raw == ":memory:" or raw.startswith("file:"):
        # An in-memory database lives in one connection of one process (a broker or store no
        # other process can reach); a file: URI is not read as one (no uri=True).
        raise ConfigError(
            f"sqlite URL {url!r} is not a file path; oncely's SQLite backends share a file "
            "between processes (memory:// is the in-process backend)"
        )
    return Path(raw), dict(parse_qsl(parts.query, keep_blank_values=True))


def option(options: dict[str, str], name: str, default: float, url: str) -> float:
    """Read a positive number option from a URL's query, with a precise error."""
    return number(options, name, default, url)


def reject_unknown(options: dict[str, str], url: str, known: Collection[str]) -> None:
    """Refuse the options left in ``options`` (those not popped), naming the ``known`` ones."""
    if options:
        raise ConfigError(
            f"{url!r}: unknown option(s) {', '.join(sorted(options))}; "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )


async def open_db(path: Path, busy_timeout: float = BUSY_TIMEOUT_MS / 1000) -> aiosqlite.Connection:
    """Open ``path`` in WAL mode with a busy timeout (seconds), creating its directory.

    Transactions are explicit (``isolation_level=None``): a read-modify-write is either one
    statement or runs under ``BEGIN IMMEDIATE``, so that claims stay atomic across processes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with map_sqlite_errors(StoreUnavailable):
        connecting = aiosqlite.connect(str(path), isolation_level=None, timeout=busy_timeout)
        # A daemon thread: a Publisher or App(broker=...) the script never closed would keep
        # the process from exiting, for ever. Every write oncely confirmed has committed.
        _daemon(connecting)
        try:
            db = await connecting
        except BaseException:
            _join_worker(connecting)
            raise
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        except BaseException:
            # e.g. "file is not a database": without this the connection's worker thread
            # outlives the error and keeps the process from exiting.
            await db.close()
            raise
    return db


def _daemon(connection: aiosqlite.Connection) -> None:
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True


def _join_worker(connection: aiosqlite.Connection) -> None:
    """Wait for the worker thread of a failed connect.

    aiosqlite stops that thread without waiting for it; the thread then posts to the event
    loop, and dies with "Event loop is closed" if the loop ended meanwhile. It has no SQLite
    work left, so the join takes microseconds.
    """
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        thread.join(timeout=1.0)


@contextlib.contextmanager
def map_sqlite_errors(
    error: type[Exception],
    *,
    other: type[Exception] | None = None,
    what: str = "sqlite",
    missing_table: str | None = None,
) -> Iterator[None]:
    """Translate sqlite3's errors into ``error``, chaining the original.

    Args:
        error: for operational errors (locked, I/O, closed connection).
        other: for the rest (a constraint, a corrupt file, ...); ``error`` unless given.
        what: the prefix of the message.
        missing_table: given, "no such table" is a ``ConfigError`` with this hint added.
    """
    try:
        yield
    except sqlite3.OperationalError as exc:
        if missing_table is not None and "no such table" in str(exc):
            raise ConfigError(f"{what}: {exc}; {missing_table}") from exc
        raise error(f"{what}: {exc}") from exc
    except (sqlite3.Error, ValueError) as exc:
        # aiosqlite raises ValueError("no active connection") once closed.
        raise (other or error)(f"{what}: {exc}") from exc


@contextlib.asynccontextmanager
async def immediate(
    db: aiosqlite.Connection, lock: asyncio.Lock
) -> AsyncIterator[aiosqlite.Connection]:
    """A ``BEGIN IMMEDIATE`` transaction: takes the write lock up front, so two processes never
    both read a row as free and then both claim it.

    ``lock`` guards the connection: aiosqlite runs statements of all tasks on one thread, so
    without it another task's statement would land inside this transaction.
    """
    async with lock:
        await begin_immediate(db)
        try:
            yield db
        except BaseException:
            # Shielded: a cancelled handler must still leave the connection outside a
            # transaction, or the next BEGIN on it fails.
            await asyncio.shield(db.execute("ROLLBACK"))
            raise
        await asyncio.shield(db.execute("COMMIT"))


async def begin_immediate(db: aiosqlite.Connection) -> None:
    """``BEGIN IMMEDIATE`` that stays correct when the waiting task is cancelled.

    aiosqlite keeps running a statement on its thread after the awaiting task is cancelled.
    A ``BEGIN`` cancelled while it waits for another writer would then open a transaction
    nobody ends: the connection would hold the database's write lock for good, and every
    later ``BEGIN`` on it would fail. The rollback is queued behind the ``BEGIN`` on the same
    thread, so it undoes exactly what the ``BEGIN`` started.
    """
    try:
        await db.execute("BEGIN IMMEDIATE")
    except asyncio.CancelledError:
        await asyncio.shield(rollback_quietly(db))
        raise


async def rollback_quietly(db: aiosqlite.Connection) -> None:
    """``ROLLBACK`` when a transaction may or may not be open, on a cleanup path whose own
    exception must win."""
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")
