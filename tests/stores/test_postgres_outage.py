"""A real PostgreSQL outage under a running Worker: a private server (never the shared one)
is stopped with handlers in flight and started again."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest

import oncely
from tests._wait import eventually
from tests.stores._pg_server import PrivatePostgres


async def sql(query: str, url: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[Any] = await conn.fetch(query)
        return rows
    finally:
        await conn.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


KEYS = 150
FIRST = 40
"""Keys that run before the outage; the handlers of the others wait for the gate."""


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("transactional", [True, False], ids=["transactional", "plain"])
async def test_store_outage_fails_closed_and_loses_or_duplicates_nothing(
    private_pg: PrivatePostgres, unique: str, transactional: bool
) -> None:
    """PostgreSQL is stopped mid-run, with handlers in flight, and started again: nothing runs
    while it is down (fail closed, deliveries deferred), and in the end every key has exactly
    one effect. Deferrals do not spend the failure budget: each message that waited out the
    outage fails once more afterwards, and with ``max_attempts=3`` none is dead-lettered."""
    await sql("CREATE TABLE effects (key text NOT NULL)", private_pg.url)
    plain_effects: Counter[str] = Counter()
    gate = asyncio.Event()
    failed_once: set[str] = set()
    app = oncely.App(idempotent=True)

    @app.handler(
        "outage",
        key="payload:key",
        concurrency=8,
        visibility=3.0,
        transactional=transactional,
        retry=oncely.RetryPolicy(max_attempts=3, base=0.05, cap=0.2),
    )
    async def effect(payload: dict[str, str], ctx: oncely.Context) -> None:
        n = int(payload["key"][1:])
        if n >= FIRST:
            await gate.wait()
        if n >= FIRST + 8 and payload["key"] not in failed_once:
            failed_once.add(payload["key"])  # deferred through the outage, now one failure
            raise RuntimeError("transient failure after the outage")
        if transactional:
            await ctx.connection.execute("INSERT INTO effects VALUES ($1)", payload["key"])
        else:
            plain_effects[payload["key"]] += 1

    store_url = f"{private_pg.url}?table=oncely_keys&command_timeout=2&pool_max=10"
    async with oncely.Worker(app, broker=f"memory://{unique}", store=store_url) as worker:
        for n in range(KEYS):
            await app.publish("outage", {"key": f"k{n}"})
        stats = worker.stats
        await eventually(lambda: stats.processed == FIRST and worker.in_flight == 8, within=60)
        await anyio.to_thread.run_sync(private_pg.stop)
        deferred = stats.deferred
        gate.set()  # the handlers in flight meet the outage
        # Fail closed: while the store is down, messages are deferred, and none runs.
        # Each waiting message is deferred three times on average: more than max_attempts.
        await eventually(lambda: stats.deferred >= deferred + 3 * (KEYS - FIRST), within=60)
        processed = stats.processed
        await anyio.to_thread.run_sync(private_pg.start)
        await eventually(
            lambda: stats.processed + stats.duplicates + stats.dead_lettered >= KEYS, within=120
        )
        assert processed <= FIRST + 8  # only handlers already past begin could finish
        assert stats.dead_lettered == 0
        assert len(failed_once) == KEYS - FIRST - 8
    if transactional:
        rows = await sql("SELECT key, count(*) FROM effects GROUP BY key", private_pg.url)
        assert len(rows) == KEYS and all(row[1] == 1 for row in rows)
    else:
        assert set(plain_effects) == {f"k{n}" for n in range(KEYS)}
        assert set(plain_effects.values()) == {1}
