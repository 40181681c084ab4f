"""Helpers of the outbox tests: database URLs, unique tables, user transactions on either
dialect, a broker wrapper that refuses chosen topics, and a TCP fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiosqlite
import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

from oncely.brokers.base import Broker, Subscription
from oncely.errors import PublishFailed
from oncely.stores.outbox import Outbox

PG_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)
AMQP_URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def table_name() -> str:
    """A table name no other test (or agent sharing the database) uses."""
    return f"ob_{os.getpid()}_{uuid.uuid4().hex[:10]}"


def db_url(dialect: str, tmp_path: Path) -> str:
    return PG_URL if dialect == "postgresql" else f"sqlite:///{tmp_path / 'app.db'}"


async def drop(outbox: Outbox) -> None:
    """Drop a test's outbox table (PostgreSQL is shared; SQLite files go with tmp_path)."""
    if outbox.dialect == "postgresql":
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {outbox.table}")
            await conn.execute(f"DROP TABLE IF EXISTS {outbox.table}_biz")
        finally:
            await conn.close()


class UserDb:
    """The application's own connection, on either dialect, with a business table
    ``<outbox table>_biz`` to write next to the outbox row."""

    def __init__(self, outbox: Outbox, url: str) -> None:
        self.outbox = outbox
        self.url = url
        self.biz = f"{outbox.table}_biz"
        self.conn: Any = None

    async def open(self) -> None:
        if self.outbox.dialect == "postgresql":
            self.conn = await asyncpg.connect(self.url)
            await self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.biz} (id text PRIMARY KEY)")
        else:
            path = self.url.removeprefix("sqlite:///")
            self.conn = await aiosqlite.connect(path, isolation_level=None, timeout=30)
            await self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.biz} (id TEXT PRIMARY KEY)")

    async def close(self) -> None:
        await self.conn.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""
        if self.outbox.dialect == "postgresql":
            async with self.conn.transaction():
                yield self.conn
            return
        await self.conn.execute("BEGIN")
        try:
            yield self.conn
        except BaseException:
            await self.conn.execute("ROLLBACK")
            raise
        await self.conn.execute("COMMIT")

    async def insert_biz(self, conn: Any, row_id: str) -> None:
        if self.outbox.dialect == "postgresql":
            await conn.execute(f"INSERT INTO {self.biz} (id) VALUES ($1)", row_id)
        else:
            await conn.execute(f"INSERT INTO {self.biz} (id) VALUES (?)", (row_id,))

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        if self.outbox.dialect == "postgresql":
            return [tuple(r) for r in await self.conn.fetch(sql)]
        return [tuple(r) for r in await self.conn.execute_fetchall(sql)]


class RefusingBroker(Broker):
    """A real broker behind a switch: publishes to topics in ``refuse`` fail with
    ``PublishFailed`` (as a broker that nacks them would), everything else passes through,
    after a random pause of up to ``slow`` seconds (a broker far away)."""

    def __init__(self, inner: Broker, refuse: set[str] | None = None, slow: float = 0.0) -> None:
        self.inner = inner
        self.refuse = refuse if refuse is not None else set()
        self.slow = slow
        self.capabilities = inner.capabilities
        self.url = inner.url
        self.refused = 0

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        if topic in self.refuse:
            self.refused += 1
            raise PublishFailed(f"refused by the test: {topic}")
        if self.slow:
            await asyncio.sleep(random.uniform(0, self.slow))
        return await self.inner.publish(
            topic, body, headers=headers, message_id=message_id, delay=delay
        )

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        return self.inner.consume(topic, prefetch=prefetch, visibility=visibility)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FaultProxy:
    """A TCP proxy in front of a real server; ``cut()`` drops every connection and refuses
    new ones (accepts and closes them at once) until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.listen_port = 0
        self.cut_off = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if self.cut_off:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


P = TypeVar("P", bound=FaultProxy)


async def pg_behind_proxy(kind: type[P]) -> tuple[P, str]:
    """A started proxy of ``kind`` in front of the shared PostgreSQL, and the URL that goes
    through it."""
    target = urlsplit(PG_URL)
    proxy = kind(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    via = PG_URL.replace(
        f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{proxy.listen_port}"
    )
    return proxy, via


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(  # an outbox on each database, with a user connection beside it
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: object
) -> AsyncIterator[UserDb]:
    url = db_url(request.param, tmp_path)
    outbox = Outbox.from_url(url, table=table_name())
    await outbox.migrate()
    user = UserDb(outbox, url)
    await user.open()
    try:
        yield user
    finally:
        await user.close()
        await drop(outbox)
