"""The handler module the across-pods end-to-end test runs in worker processes (`oncely run`).

Environment: ``E2E_TOPIC`` (the RabbitMQ topic), ``E2E_MODE`` (``transactional`` or
``plain``), ``E2E_PG`` (the PostgreSQL holding the effects table), ``E2E_EFFECTS`` (that
table's name), ``E2E_SLOW`` (seconds the handler lingers after its effect, widening the window
a SIGKILL can land in).

The effect is a row in PostgreSQL either way. In transactional mode it is written through
``ctx.connection``, in the store's transaction; in plain mode through the app's own pool, and
committed before the store records completion: the crash window the test measures.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

import oncely

TOPIC = os.environ.get("E2E_TOPIC", "e2e-pods")
MODE = os.environ.get("E2E_MODE", "transactional")
PG = os.environ.get("E2E_PG", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")
EFFECTS = os.environ.get("E2E_EFFECTS", "e2e_effects")
SLOW = float(os.environ.get("E2E_SLOW", "0"))
INSERT = f"INSERT INTO {EFFECTS} (key, pid) VALUES ($1, $2)"

app = oncely.App("e2e-pods", idempotent=True)
_pool: Any = None


@app.on_startup
async def open_effects_pool() -> None:
    global _pool
    if MODE != "transactional":
        _pool = await asyncpg.create_pool(PG, min_size=1, max_size=8)


@app.on_shutdown
async def close_effects_pool() -> None:
    if _pool is not None:
        await _pool.close()


@app.handler(
    TOPIC,
    name="effect",
    key="payload:key",
    concurrency=8,
    visibility=2.0,
    transactional=MODE == "transactional",
)
async def effect(payload: dict[str, Any], ctx: oncely.Context) -> None:
    if MODE == "transactional":
        await ctx.connection.execute(INSERT, payload["key"], os.getpid())
    else:
        await _pool.execute(INSERT, payload["key"], os.getpid())
    if SLOW:
        await asyncio.sleep(SLOW)
