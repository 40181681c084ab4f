"""``oncely_outbox_backlog`` and ``oncely_outbox_oldest_row_age_seconds`` for an outbox whose
relay runs next to a worker (``Worker.watch_outbox``), on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest

import oncely
from oncely.stores.outbox import OutboxRelay
from tests._wait import eventually
from tests.runtime._probe import scrape, value
from tests.stores._outbox_support import UserDb, db

__all__ = ["db"]  # the fixture, used by name

pytestmark = pytest.mark.anyio


async def test_outbox_backlog_and_age_are_sampled_then_drain(db: UserDb, unique: str) -> None:
    app = oncely.App()

    @app.handler(unique, name="sink")
    async def sink(_: dict[str, int]) -> None: ...

    outbox = db.outbox
    added = time.time()
    for n in range(3):
        async with db.transaction() as conn:
            await outbox.add(conn, unique, {"n": n})
    broker = f"memory://{unique}"
    table = outbox.table
    async with oncely.Worker(app, broker=broker) as worker:
        worker.observer.interval = 0.1
        relay = OutboxRelay(outbox, broker, poll=0.05)
        await outbox.connect()
        try:
            worker.watch_outbox(relay)
            port = await worker.serve_http(0)
            await eventually(lambda: table in worker.observer.outbox_samples)
            samples = await scrape(port)
            assert value(samples, "oncely_outbox_backlog", outbox=table) == 3
            age = value(samples, "oncely_outbox_oldest_row_age_seconds", outbox=table)
            assert age is not None and 0 <= age <= time.time() - added + 1
            async with relay:
                await eventually(lambda: worker.stats.acked == 3)
                await eventually(lambda: worker.observer.outbox_samples[table].backlog == 0)
            samples = await scrape(port)
            assert value(samples, "oncely_outbox_backlog", outbox=table) == 0
            assert value(samples, "oncely_outbox_oldest_row_age_seconds", outbox=table) == 0
        finally:
            await outbox.aclose()
