"""A handler whose lease another worker took over is given back as a deferral, not a failure:
the key is someone else's now, so the copy must neither spend an attempt (nor, on its last,
be dead-lettered) but come back to find the key in progress or completed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import oncely
from oncely.runtime.codec import encode, fingerprint
from oncely.stores.base import Begin
from oncely.stores.memory import MemoryStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class Recording(MemoryStore):
    """The real memory store, remembering the tokens it granted."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        begun = await super().begin(key, fingerprint, lease)
        if begun.token is not None:
            self.tokens.append(begun.token)
        return begun


@pytest.mark.parametrize("transactional", [False, True])
async def test_a_lease_taken_over_mid_handler_defers_without_spending_an_attempt(
    unique: str, transactional: bool
) -> None:
    store: MemoryStore
    if transactional:
        from tests.runtime.test_transactional_lease import RowLockStore

        class RecordingTx(RowLockStore, Recording):
            pass

        store = RecordingTx()
    else:
        store = Recording()
    assert isinstance(store, Recording)
    app = oncely.App()
    started = asyncio.Event()
    runs = 0

    # One attempt: a lost lease counted as a failure dead-letters the message at once.
    @app.handler(
        "t",
        name="h",
        idempotent=True,
        transactional=transactional,
        visibility=1.5,
        retry=oncely.RetryPolicy(max_attempts=1),
    )
    async def handle(_: Any, ctx: oncely.Context) -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()  # until the lost lease cancels it

    async with oncely.Worker(app, broker=f"memory://{unique}", store=store) as worker:
        await app.publish("t", {}, key="k")
        await asyncio.wait_for(started.wait(), 10)
        # Another worker takes the key over (the first lease gone, a new one granted); the
        # heartbeat's next renewal finds the lease lost and cancels the handler.
        await store.release("h:k", store.tokens[0])
        other = await store.begin("h:k", fingerprint(encode({})), 30)
        assert other.outcome is oncely.Outcome.NEW and other.token is not None
        await eventually(lambda: worker.stats.deferred >= 1)
        assert worker.stats.dead_lettered == 0
        assert worker.stats.failed == 0 and worker.stats.retried == 0
        # The other worker finishes: the copy comes back and is absorbed as a duplicate.
        await store.complete("h:k", other.token, None, 60)
        await eventually(lambda: worker.stats.duplicates == 1)
        assert worker.stats.dead_lettered == 0
        assert runs == 1
