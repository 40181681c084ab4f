"""Run with ``python -m tests.tracing._off_app DB``: publish, consume and re-publish on the
memory broker, add an outbox row to the SQLite file ``DB``, and print as JSON what a tracer
would have changed. ``test_tracing_off.py`` runs it as it is, with OpenTelemetry made
unimportable first, and with a tracer provider set first."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiosqlite

import oncely
from oncely.stores.outbox import Outbox


async def main(db: str) -> dict[str, Any]:
    app = oncely.App(idempotent=True)
    seen: list[dict[str, str]] = []
    both = asyncio.Event()

    @app.handler("a")
    async def first(msg: dict[str, Any], ctx: oncely.Context) -> None:
        seen.append(dict(ctx.headers))
        await ctx.publish("b", msg, key="k2")

    @app.handler("b")
    async def second(msg: dict[str, Any], ctx: oncely.Context) -> None:
        seen.append(dict(ctx.headers))
        both.set()

    async with oncely.Worker(app, broker="memory://off") as worker:
        await app.publish("a", {"n": 1}, key="k1")
        async with asyncio.timeout(10):
            await both.wait()
        tracing = [runner.tracing for runner in worker._runners]
    outbox = Outbox.from_url(f"sqlite:///{db}")
    await outbox.migrate()
    async with aiosqlite.connect(db) as conn:
        await outbox.add(conn, "c", {"n": 1}, headers={"h": "v"})
        await conn.commit()
        rows = list(await conn.execute_fetchall("SELECT headers FROM oncely_outbox"))
    return {
        "headers": sorted({name for headers in seen for name in headers}),
        "row_headers": sorted(json.loads(rows[0][0])),
        "tracing": [t is not None for t in tracing],
        "otel_imported": "opentelemetry.trace" in sys.modules,
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(asyncio.run(main(sys.argv[1]))))
