"""The embedded default broker: a durable queue in one SQLite file, ``sqlite:///path.db``.

Several worker processes on **one machine** may share the file. Every claim is a single
``UPDATE ... WHERE rowid IN (SELECT ... LIMIT n) RETURNING`` statement, which takes SQLite's
write lock before it reads, so two processes never claim the same row. A claim stamps each row
with a fresh ``claim_token``; ``ack``, ``nack``, ``reject`` and ``extend`` only touch the row
while it still carries that token, so a consumer whose visibility ran out and whose message was
claimed again gets ``DeliveryExpired`` instead of settling someone else's delivery.

Options (URL query): ``poll_interval`` (seconds, default 0.05) is how often an idle consumer
looks for work that another process published; it backs off to ``max_poll_interval`` (default
0.25) while the topic stays empty. A publish through the same ``SqliteBroker`` wakes its
consumers at once, and a consumer never sleeps past the earliest future ``visible_at`` it knows
of. ``busy_timeout`` (seconds, default 30) is how long a write waits for another process's
write lock before it fails with ``ConnectionLost``. Unknown options are an error.

Errors: every sqlite3/aiosqlite error is translated in ``map_errors()`` into ``ConnectionLost``
(the outcome of the call is unknown; nothing is lost). A settle that fails frees its prefetch
slot at once and leaves the message claimed, so it is redelivered when its visibility runs out.

Publishing a ``message_id`` still queued on the topic is a no-op returning that id, so a relay
that re-publishes after a lost confirmation does not enqueue a duplicate.

Limits:
    - One machine only. SQLite's locking is not safe over network file systems.
    - Writes are serialised: one process at a time holds the write lock, so throughput is
      bounded by commit rate (WAL with ``synchronous=NORMAL``: commits survive a process crash;
      the last few may be lost on power failure). Acks are batched into one statement per
      flush to stretch that rate.
    - Consumers in other processes learn of new messages by polling, so cross-process latency
      is up to ``max_poll_interval`` when idle.
    - Times are wall-clock (``time.time()``) because processes share the file; a clock step
      shifts delays and visibility deadlines by the same amount.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from oncely._sqlite import (
    BUSY_TIMEOUT_MS,
    immediate,
    map_sqlite_errors,
    open_db,
    option,
    parse_sqlite_url,
    reject_unknown,
)
from oncely.brokers._local import check_delay, check_topic, wake_all
from oncely.brokers._sqlite_consume import SqliteDelivery, SqliteSubscription
from oncely.brokers._sqlite_queue import (
    BACKLOG,
    CLAIM,
    DELETE_DEAD,
    INSERT_DEAD,
    NEXT_VISIBLE,
    PUBLISH,
    PURGE_DEAD,
    READ_DEAD,
    READ_DEAD_FOR_REPLAY,
    RELEASE,
    SCHEMA,
    TAKE_FOR_DEAD,
    AckBatcher,
    dead_letter,
    decode_headers,
    to_json,
)
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Subscription,
    check_headers,
    replayed_headers,
)
from oncely.errors import BrokerError, ConfigError, ConnectionLost, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import aiosqlite

__all__ = ["SqliteBroker"]


@contextlib.contextmanager
def map_errors() -> Iterator[None]:
    """Translate sqlite3 and aiosqlite errors into ``ConnectionLost``, chaining the original:
    the file is the broker, so an error reaching it is the broker being unreachable."""
    with map_sqlite_errors(ConnectionLost):
        yield


class SqliteBroker(Broker, DeadLetterAdmin):
    """A durable queue in one SQLite file; see the module docstring.

    Args:
        path: the database file (created with its directory if missing).
        poll_interval: seconds between looks for work published by other processes.
        max_poll_interval: the longest an idle consumer sleeps between looks.
        busy_timeout: seconds a write waits for another process's write lock.
    """

    ack_on_caller: ClassVar[bool] = True  # acks are group-committed on their own task

    capabilities = Capabilities(
        native_delay=True,
        max_delay=None,
        native_dlq=True,
        extend=True,
        ordering="none",
        durable=True,
        carries_errors=True,
    )

    def __init__(
        self,
        path: str | Path,
        *,
        poll_interval: float = 0.05,
        max_poll_interval: float = 0.25,
        busy_timeout: float = BUSY_TIMEOUT_MS / 1000,
    ) -> None:
        if poll_interval <= 0 or max_poll_interval < poll_interval:
            raise ValueError("need 0 < poll_interval <= max_poll_interval")
        if not busy_timeout > 0:
            raise ValueError(f"busy_timeout must be > 0, got {busy_timeout}")
        self.busy_timeout = busy_timeout
        self.path = Path(path)
        self.url = f"sqlite:///{path}"
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._instance = uuid.uuid4().hex[:12]
        self._claims = itertools.count()
        self._subs: set[SqliteSubscription] = set()
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}
        self._acks = AckBatcher(self._fetch)

    @classmethod
    def from_url(cls, url: str) -> SqliteBroker:
        """Build a broker from ``sqlite:///relative.db`` or ``sqlite:////abs.db``.

        Raises:
            ConfigError: the URL is malformed, an option is not a positive number,
                ``max_poll_interval < poll_interval``, or an option is unknown.
        """
        path, options = parse_sqlite_url(url)
        poll = option(options, "poll_interval", 0.05, url)
        max_poll = option(options, "max_poll_interval", max(0.25, poll), url)
        busy = option(options, "busy_timeout", BUSY_TIMEOUT_MS / 1000, url)
        reject_unknown(options, url, ("poll_interval", "max_poll_interval", "busy_timeout"))
        if max_poll < poll:
            raise ConfigError(f"{url!r}: max_poll_interval must be >= poll_interval")
        broker = cls(path, poll_interval=poll, max_poll_interval=max_poll, busy_timeout=busy)
        broker.url = url
        return broker

    async def connect(self) -> None:
        """Open the file and create the tables if needed. Idempotent.

        Raises:
            ConnectionLost: the file could not be opened or initialised.
        """
        if self._db is not None:
            return
        try:
            db = await open_db(self.path, self.busy_timeout)
        except StoreUnavailable as exc:
            raise ConnectionLost(str(exc)) from exc
        try:
            with map_errors():
                async with immediate(db, self._lock):
                    for statement in SCHEMA:
                        await db.execute(statement)
        except BaseException:
            await db.close()
            raise
        self._db = db

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ConnectionLost(f"{self.url} is not connected (never opened, or closed)")
        return self._db

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Run one statement under the connection lock and return its rows.

        One statement is its own transaction, and SQLite takes the write lock of a writing
        statement before it reads, so this is as atomic as ``BEGIN IMMEDIATE`` at one thread
        hop instead of three.
        """
        db = self._require()
        with map_errors():
            async with self._lock:
                return list(await db.execute_fetchall(sql, params))

    async def _exec(self, sql: str, params: tuple[Any, ...]) -> int:
        db = self._require()
        with map_errors():
            async with self._lock:
                cursor = await db.execute(sql, params)
        return cursor.rowcount

    @property
    def connected(self) -> bool:
        """The file is open (between ``connect`` and ``aclose``)."""
        return self._db is not None

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """Messages of ``topic`` claimable now (not delayed, not held by a consumer)."""
        rows = await self._fetch(BACKLOG, (topic, time.time()))
        return {"": int(rows[0][0])}

    def _wake(self, topic: str) -> None:
        waiters = self._waiters.get(topic)
        if waiters:
            wake_all(waiters)

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Insert a message; it is durable when this returns. See ``Broker.publish``.

        Raises:
            ConnectionLost: the file could not be written; the message was not stored.
        """
        encoded = to_json(check_headers(headers))
        check_delay(delay)
        check_topic(topic)
        mid = message_id if message_id is not None else uuid.uuid4().hex
        now = time.time()
        await self._exec(PUBLISH, (mid, topic, bytes(body), encoded, now, now + delay))
        self._wake(topic)
        return mid

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        """Subscribe to ``topic``; see ``Broker.consume``. Claims in batches of up to
        ``prefetch`` minus what the subscription already holds."""
        sub = SqliteSubscription(self, topic, prefetch, visibility)
        self._subs.add(sub)
        return sub

    async def aclose(self) -> None:
        """Close subscriptions (returning their buffered messages), finish queued acks and close
        the file. Idempotent. Yielded, unsettled deliveries come back when their visibility
        runs out."""
        if self._db is None:
            return
        for sub in list(self._subs):
            try:
                await sub.aclose()
            except BrokerError:
                pass  # Its claims simply expire; closing the file matters more.
        await self._acks.drain()
        db, self._db = self._db, None
        async with self._lock:
            await db.close()

    async def _claim(self, topic: str, n: int, visibility: float) -> list[Any]:
        now = time.time()
        prefix = f"{self._instance}.{next(self._claims)}:"
        return await self._fetch(CLAIM, (now + visibility, prefix, topic, now, n))

    async def _next_visible(self, topic: str) -> float | None:
        rows = await self._fetch(NEXT_VISIBLE, (topic,))
        value: float | None = rows[0][0]
        return value

    async def _release(self, deliveries: list[SqliteDelivery]) -> None:
        """Give claimed, never-yielded messages back at once, uncounting their attempt."""
        db = self._require()
        now = time.time()
        params = [(now, d._rowid, d._token) for d in deliveries]
        with map_errors():
            async with immediate(db, self._lock):
                await db.executemany(RELEASE, params)
        self._wake(deliveries[0].topic)

    async def _reject(self, d: SqliteDelivery, reason: str) -> bool:
        db = self._require()
        with map_errors():
            async with immediate(db, self._lock):
                rows = list(await db.execute_fetchall(TAKE_FOR_DEAD, (d._rowid, d._token)))
                if not rows:
                    return False
                await db.execute(INSERT_DEAD, (*rows[0], reason, time.time()))
        return True

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """List dead letters of ``topic``, oldest first; see ``DeadLetterAdmin``."""
        rows = await self._fetch(READ_DEAD, (topic, limit))
        return [dead_letter(topic, row) for row in rows]

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        """Move dead letters back to ``topic`` with attempt count 0, in one transaction (all
        or none of them move).

        A dead letter whose id is queued on the topic again stays in the dead-letter table.
        """
        db = self._require()
        now = time.time()
        where = "topic = ?" + (
            "" if ids is None else " AND msg_id IN (SELECT value FROM json_each(?))"
        )
        params: tuple[Any, ...] = (topic,) if ids is None else (topic, to_json(ids))
        moved = 0
        with map_errors():
            async with immediate(db, self._lock):
                rows = await db.execute_fetchall(READ_DEAD_FOR_REPLAY.format(where=where), params)
                for dead_id, mid, body, headers, enqueued_at in rows:
                    fresh = to_json(replayed_headers(decode_headers(headers), now))
                    cursor = await db.execute(PUBLISH, (mid, topic, body, fresh, enqueued_at, now))
                    if cursor.rowcount:
                        await db.execute(DELETE_DEAD, (dead_id,))
                        moved += 1
        if moved:
            self._wake(topic)
        return moved

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds (all with ``None``) in one
        transaction; see ``DeadLetterAdmin``."""
        cutoff = float("inf") if older_than is None else time.time() - older_than
        return await self._exec(PURGE_DEAD, (topic, cutoff))
