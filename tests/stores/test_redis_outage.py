"""A worker on the memory broker with an effectively-once handler lives through an outage of
its Redis store: a private redis-server SIGKILLed mid-run and restarted on the same port."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.stores._redis_support import PrivateRedis, with_options


@pytest.mark.anyio
async def test_worker_fails_closed_through_a_store_outage(
    tmp_path: Path, unique: str, report: Callable[[str], None], anyio_backend: object
) -> None:
    """A private Redis with an append-only file fsynced on every write is SIGKILLed while a
    worker (memory broker, effectively-once handler) runs, and restarted on the same port.

    Persistence is the point: the store's state survives the restart, so duplicates of keys
    completed *before* the outage, delivered *after* it, are still absorbed. Without it
    (``appendonly no``), Redis comes back empty and each of those would run again: a store
    without persistence dedupes only within its own uptime.

    Checked: no handler starts while the store is down (fail closed); every key's effect
    happens exactly once; every duplicate is absorbed; nothing is dead-lettered although each
    waiting message was deferred more often than ``max_attempts`` (3), and every fifth key's
    handler fails on its first run, so a deferral that counted as an attempt would exhaust
    it. Keys whose handler was running when the store died cannot record completion (logged);
    no duplicate of them is published, so that plain-store window is not what is measured.
    """
    app = oncely.App()
    effects: Counter[str] = Counter()
    failed_once: set[str] = set()
    store_down = False
    started_while_down = 0

    @app.handler(
        "outage",
        idempotent=True,
        key="payload:id",
        concurrency=8,
        timeout=2.0,
        visibility=3.0,
        retry=oncely.RetryPolicy(max_attempts=3, base=0.05, cap=0.2),
    )
    async def handle(job: dict[str, Any]) -> None:
        nonlocal started_while_down
        if store_down:
            started_while_down += 1
        await asyncio.sleep(0.005)
        if int(job["id"].rsplit("-", 1)[1]) % 5 == 0 and job["id"] not in failed_once:
            failed_once.add(job["id"])
            raise RuntimeError("first run fails")
        effects[job["id"]] += 1

    before = [f"{unique}-{i}" for i in range(100)]
    during = [f"{unique}-{i}" for i in range(100, 300)]
    late = [f"{unique}-{i}" for i in range(300, 350)]
    published = len(before) + 2 * len(during) + len(late)  # `during` comes with duplicates
    server = PrivateRedis(tmp_path / "redis", appendonly=True)
    await server.start()
    try:
        store = RedisStore(with_options(server.url, socket_timeout=2, connect_timeout=1))
        # The worker does not close a store it was handed as an instance.
        async with store, oncely.Worker(app, broker=f"memory://{unique}", store=store) as worker:
            stats = worker.stats

            def settled() -> int:
                return stats.processed + stats.duplicates + stats.dead_lettered

            for key in before:
                await app.publish("outage", {"id": key})
            await eventually(lambda: stats.processed == len(before), within=30)
            # Each `before` key twice more, between the new keys.
            for key, dup in zip(during, before + before, strict=True):
                await app.publish("outage", {"id": key})
                await app.publish("outage", {"id": dup})
            await eventually(lambda: stats.processed >= len(before) + 30, within=30)
            await server.kill()
            deferred_at_kill = stats.deferred
            # Two rounds of begins (the handler's concurrency is 8) have failed since: every
            # reply the server sent before it died has long been read, so from here no
            # handler may start until the store is back.
            await eventually(lambda: stats.deferred >= deferred_at_kill + 16, within=30)
            store_down = True
            for key in late:
                await app.publish("outage", {"id": key})
            waiting = published - settled()
            base = stats.deferred
            # Four deferrals per waiting message on average: some message was deferred more
            # often than max_attempts allows attempts.
            await eventually(lambda: stats.deferred - base >= 4 * waiting, within=60)
            down_deferrals = stats.deferred - base
            store_down = False
            await server.start()
            await eventually(lambda: settled() == published, within=60)
            assert isinstance(worker.broker, DeadLetterAdmin)
            letters = await worker.broker.dead_letters("outage")
    finally:
        if server.process is not None:
            await server.kill()
    report(
        f"redis store outage: {published} deliveries of {len(effects)} keys; "
        f"{waiting} waited through the outage, deferred {down_deferrals} times while Redis "
        f"was down; {stats.duplicates} duplicates absorbed, {stats.retried} retried, "
        f"{len(letters)} dead-lettered, {started_while_down} handlers started while down, "
        f"max effects per key {max(effects.values())}"
    )
    assert started_while_down == 0
    assert [(d.id, d.reason) for d in letters] == [], "deferrals must not spend attempts"
    assert effects == dict.fromkeys(before + during + late, 1)
    assert stats.duplicates == 2 * len(before)
