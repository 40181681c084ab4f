"""The handler module the SQLite end-to-end tests run in worker processes via `oncely run`.

Environment: ``E2E_DB`` (the SQLite file holding queue, store and effects), ``E2E_MODE``
(``transactional`` or ``plain``), ``E2E_SLOW`` (seconds the handler lingers after its effect,
widening the window a SIGKILL can land in).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiosqlite

import oncely

MODE = os.environ.get("E2E_MODE", "transactional")
SLOW = float(os.environ.get("E2E_SLOW", "0"))
DB = os.environ.get("E2E_DB", "e2e.db")

app = oncely.App("e2e", idempotent=True)
_conn: aiosqlite.Connection | None = None
_lock = asyncio.Lock()


async def _effects_connection() -> aiosqlite.Connection:
    global _conn
    if _conn is None:
        _conn = await aiosqlite.connect(DB, isolation_level=None, timeout=30)
        await _conn.execute("PRAGMA busy_timeout=30000")
    return _conn


@app.on_shutdown
async def close_effects_connection() -> None:
    # aiosqlite's thread is not a daemon: an open connection would keep the process alive.
    if _conn is not None:
        await _conn.close()


@app.handler(
    "e2e",
    name="effect",
    key="payload:key",
    concurrency=8,
    visibility=2.0,
    transactional=MODE == "transactional",
)
async def effect(payload: dict[str, Any], ctx: oncely.Context) -> None:
    if MODE == "transactional":
        # The effect and the completion record commit in one SQLite transaction.
        await ctx.connection.execute(
            "INSERT INTO effects(key, pid) VALUES (?, ?)", (payload["key"], os.getpid())
        )
    else:
        conn = await _effects_connection()
        async with _lock:
            await conn.execute(
                "INSERT INTO effects(key, pid) VALUES (?, ?)", (payload["key"], os.getpid())
            )
    if SLOW:
        await asyncio.sleep(SLOW)


# 2 s windows (a beat every 0.67 s): a worker process starved of CPU for under a second on a
# loaded CI machine must not look like a dead one.
@app.handler("hold", name="hold", concurrency=1, visibility=2.0, guarantee="at_least_once")
async def hold(payload: dict[str, Any], ctx: oncely.Context) -> None:
    """Record the run (with its attempt), then, in the worker told to, block until killed."""
    conn = await _effects_connection()
    async with _lock:
        await conn.execute(
            "INSERT INTO effects(key, pid, attempt) VALUES (?, ?, ?)",
            (payload["key"], os.getpid(), ctx.attempt),
        )
    if os.environ.get("E2E_BLOCK"):
        await asyncio.sleep(3600)
