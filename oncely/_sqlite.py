"""SQLite plumbing shared by the SQLite broker and store.

URLs follow SQLAlchemy's rule: ``sqlite:///jobs.db`` is relative to the working directory,
``sqlite:////var/lib/jobs.db`` is absolute. Query parameters carry backend options.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import parse_qsl, urlsplit

import aiosqlite

from oncely.errors import ConfigError, StoreUnavailable

T = TypeVar("T")
R = TypeVar("R")

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
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not raw:
        raise ConfigError(f"sqlite URL {url!r} names no file; write sqlite:///path/to.db")
    return Path(raw), dict(parse_qsl(parts.query, keep_blank_values=True))


def option(options: dict[str, str], name: str, default: float, url: str) -> float:
    """Read a positive number option from a URL's query, with a precise error."""
    raw = options.pop(name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{url!r}: option {name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{url!r}: option {name} must be > 0, got {raw}")
    return value


def reject_unknown(options: dict[str, str], url: str) -> None:
    if options:
        raise ConfigError(f"{url!r}: unknown option(s) {', '.join(sorted(options))}")


async def open_db(path: Path, busy_timeout: float = BUSY_TIMEOUT_MS / 1000) -> aiosqlite.Connection:
    """Open ``path`` in WAL mode with a busy timeout (seconds), creating its directory.

    Transactions are explicit (``isolation_level=None``): a read-modify-write is either one
    statement or runs under ``BEGIN IMMEDIATE``, so that claims stay atomic across processes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with map_sqlite_errors(StoreUnavailable):
        connecting = aiosqlite.connect(str(path), isolation_level=None, timeout=busy_timeout)
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


class GroupCommit(Generic[T, R]):
    """Group commit: calls that arrive while a batch is being written share the next write,
    so many concurrent callers cost one statement (one thread hop, one commit) instead of one
    each, while every caller still waits for, and gets, its own outcome.

    A write runs as soon as the previous one is done, so a lone call is not delayed.

    Args:
        write: writes one batch and returns one outcome per item, in order: a value, or an
            exception that fails that item alone. An exception it raises fails every item of
            the batch with a copy of it, so it must not raise once part of the batch is
            committed and reportable: a caller may be told "unknown", never "done" for
            something that was not.
        limit: the most items one write gets.
        abandoned: awaited with an item and its value when the caller stopped waiting
            (was cancelled) before it got that value, e.g. to give back a lease nobody will
            use. It must not raise.
    """

    __slots__ = ("_abandoned", "_limit", "_queue", "_task", "_write")

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        limit: int,
        abandoned: Callable[[T, R], Awaitable[None]] | None = None,
    ) -> None:
        self._write = write
        self._limit = limit
        self._abandoned = abandoned
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next write and return its outcome; raises its error."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._flush())
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled after the outcome arrived but before this task resumed: the value
            # is lost to the caller, so it counts as abandoned. (Cancelled earlier, the
            # future is cancelled too, and _flush sees to it.)
            abandoned = self._abandoned
            if abandoned is not None and fut.done() and not fut.cancelled():
                if fut.exception() is None:
                    await asyncio.shield(abandoned(item, fut.result()))
            raise

    async def drain(self) -> None:
        """Wait until every queued item has been written (or failed)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch = self._queue[: self._limit]
                del self._queue[: self._limit]
                try:
                    outcomes = await self._write([item for item, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        _fail(fut, exc)
                    continue
                for (item, fut), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        if not fut.done():
                            fut.set_exception(outcome)
                    elif not fut.done():
                        fut.set_result(outcome)
                    elif self._abandoned is not None:
                        await self._abandoned(item, outcome)
                batch = []
        except BaseException:
            # This task was cancelled (the loop is shutting down): nobody writes these now.
            for _, fut in (*batch, *self._queue):
                fut.cancel()
            self._queue.clear()
            raise
        finally:
            self._task = None


def _fail(fut: asyncio.Future[R], exc: Exception) -> None:
    """Fail one waiter of a batch with its own copy of the batch's error: each raise appends
    its frames to the traceback of the instance it raises."""
    if fut.done():
        return
    try:
        err = copy.copy(exc)
    except Exception:
        err = exc
    err.__cause__ = exc.__cause__
    fut.set_exception(err)


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
def map_sqlite_errors(error: type[Exception]) -> Iterator[None]:
    """Translate every sqlite3 error (busy past the timeout, I/O, corruption, misuse of a closed
    connection) into ``error``, chaining the original."""
    try:
        yield
    except (sqlite3.Error, ValueError) as exc:
        # aiosqlite raises ValueError("no active connection" / "Connection closed") once closed.
        raise error(f"sqlite: {exc}") from exc


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
