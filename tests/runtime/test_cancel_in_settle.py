"""A shutdown cancel that lands while a settle the runner started itself (a dead-letter, a
deferral's nack) is on its way: the settle finishes and is counted, and nothing is given back
on top of it.

On SQLite the statement goes on without its caller: the connection's thread runs it (the
dead-letter's ``COMMIT``, the nack's ``UPDATE``) after the cancel. Before, the delivery still
read unsettled, so the runner gave it back too: the give-back failed against the row the settle
had moved (a settle error and a WARNING, the dead letter or deferral not counted). The memory
broker has no such window: its ``reject`` and ``nack`` are one synchronous step on the hub.

The connection's thread is held at the start of the statement by a trace callback, so the
cancel lands exactly there, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.brokers.sqlite import SqliteBroker
from oncely.errors import StoreUnavailable
from tests._wait import eventually
from tests.runtime._faulty import FaultyStore

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def held_at(
    broker: SqliteBroker, when: Callable[[str, list[str]], bool]
) -> AsyncIterator[asyncio.Event]:
    """Hold ``broker``'s connection thread at the first statement for which ``when(sql, seen)``
    holds (``seen``: the statements before it); the event yielded is set once it is held. The
    thread goes on when the block ends (or after 30 s, should the test fail first)."""
    db = broker._db
    assert db is not None
    loop = asyncio.get_running_loop()
    held = asyncio.Event()
    go = threading.Event()
    seen: list[str] = []

    def trace(sql: str) -> None:  # on the connection's thread
        if not held.is_set() and when(sql, seen):
            loop.call_soon_threadsafe(held.set)
            go.wait(30)
        seen.append(sql)

    # aiosqlite's own way to run a call on the connection's thread (sqlite3 checks the thread).
    on_its_thread: Callable[..., Awaitable[object]] = db._execute
    await on_its_thread(db._conn.set_trace_callback, trace)
    try:
        yield held
    finally:
        go.set()


def counts(path: Path) -> tuple[int, int]:
    """Messages queued and dead-lettered in the SQLite file."""
    with sqlite3.connect(path) as check:
        (queued,) = check.execute("SELECT count(*) FROM oncely_messages").fetchone()
        (dead,) = check.execute("SELECT count(*) FROM oncely_dead_letters").fetchone()
    return queued, dead


async def cancel_in_settle(
    worker: oncely.Worker, held: asyncio.Event, caplog: pytest.LogCaptureFixture
) -> asyncio.Task[None]:
    """Once the settle is held, stop ``worker`` with no grace: the handler task is cancelled
    in the settle. Returns the stop, to await once the statement may go on."""
    await asyncio.wait_for(held.wait(), 10)
    stopping = asyncio.create_task(worker.stop(grace=0))
    # Logged in the same step as the cancel, so the cancel was requested once this is seen.
    await eventually(lambda: "cancelling 1 handler(s)" in caplog.text)
    return stopping


async def test_a_cancel_during_a_dead_letters_commit_lets_it_finish(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oncely")
    path = tmp_path / "q.db"
    app = oncely.App()

    @app.handler("jobs", guarantee="at_least_once", concurrency=1)
    async def handle(_: dict[str, Any]) -> None: ...

    broker = SqliteBroker(path)
    worker = oncely.Worker(app, broker=broker)
    await worker.start()
    try:
        # The COMMIT of the dead-letter's transaction (its DELETE and INSERT are done).
        dead_letter_commit = held_at(
            broker,
            lambda sql, seen: (
                sql == "COMMIT"
                and any(s.startswith("INSERT INTO oncely_dead_letters") for s in seen)
            ),
        )
        async with dead_letter_commit as held:
            await broker.publish("jobs", b"not json")  # undecodable: dead-lettered
            stopping = await cancel_in_settle(worker, held, caplog)
        await asyncio.wait_for(stopping, 30)
    finally:
        await worker.stop(0.0)
    assert counts(path) == (0, 1)  # dead-lettered, and not back in the queue
    assert worker.stats.dead_lettered == 1, worker.stats
    assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
    assert "nack of" not in caplog.text, caplog.text
    await broker.aclose()


async def test_a_cancel_during_a_deferrals_nack_lets_it_finish(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oncely")
    path = tmp_path / "q.db"
    app = oncely.App()

    @app.handler(
        "jobs",
        idempotent=True,
        concurrency=1,
        retry=oncely.RetryPolicy(base=30, jitter=False),
    )
    async def handle(_: dict[str, Any]) -> None: ...

    store = FaultyStore()
    store.begin_error = StoreUnavailable("down")  # fail closed: a deferral, with a delay
    broker = SqliteBroker(path)
    worker = oncely.Worker(app, broker=broker, store=store)
    await worker.start()
    try:
        # The nack's UPDATE (a deferral keeps the attempt: attempts - 1).
        deferral = held_at(
            broker,
            lambda sql, seen: (
                sql.startswith("UPDATE oncely_messages") and "attempts = attempts - 1" in sql
            ),
        )
        async with deferral as held:
            await app.publish("jobs", {"n": 1}, key="k")
            stopping = await cancel_in_settle(worker, held, caplog)
        await asyncio.wait_for(stopping, 30)
    finally:
        await worker.stop(0.0)
    assert counts(path) == (1, 0)  # back in the queue, after the deferral's delay
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT attempts, claim_token FROM oncely_messages").fetchall() == [
            (0, None)
        ]
    assert worker.stats.deferred == 1, worker.stats
    assert worker.stats.settle_errors == 0 and worker.stats.cancelled == 0, worker.stats
    assert "nack of" not in caplog.text, caplog.text
    await broker.aclose()
