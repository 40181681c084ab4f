"""A ``Context`` kept past its handler: its transaction's connection must not be usable."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import msgspec
import pytest

import oncely
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str


async def test_ctx_connection_after_the_transaction_ended_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as setup:
        setup.execute("CREATE TABLE effects (id TEXT)")
    app = oncely.App()
    b_in_transaction = asyncio.Event()
    late_done = asyncio.Event()
    late_errors: list[Exception] = []
    tasks: list[asyncio.Task[None]] = []

    async def late(ctx: oncely.Context) -> None:
        # A task the handler started and left running: by now its transaction has committed
        # and the pooled connection runs another message's transaction.
        await b_in_transaction.wait()
        try:
            await ctx.connection.execute("INSERT INTO effects VALUES ('late')")
        except Exception as exc:
            late_errors.append(exc)
        finally:
            late_done.set()

    @app.handler("orders", idempotent=True, transactional=True, key="payload:id", concurrency=1)
    async def handle(order: Order, ctx: oncely.Context) -> None:
        await ctx.connection.execute("INSERT INTO effects VALUES (?)", (order.id,))
        if order.id == "a":
            tasks.append(asyncio.create_task(late(ctx)))
        else:
            b_in_transaction.set()
            await late_done.wait()
            raise oncely.Reject("b fails: its writes roll back")

    url = f"sqlite:///{db}"
    async with oncely.Worker(app, broker=url, store=url) as worker:
        await app.publish("orders", Order(id="a"))
        await eventually(lambda: worker.stats.processed == 1)
        await app.publish("orders", Order(id="b"))
        await eventually(lambda: worker.stats.dead_lettered == 1)
    await asyncio.gather(*tasks)
    with sqlite3.connect(db) as check:
        rows = [r for (r,) in check.execute("SELECT id FROM effects ORDER BY id")]
    assert rows == ["a"]
    # Before, the late write went silently into b's transaction (rolled back with it here;
    # committed with b's key had b succeeded), or committed on its own between transactions.
    (error,) = late_errors
    assert isinstance(error, RuntimeError) and "transaction has ended" in str(error)
