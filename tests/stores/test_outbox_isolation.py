"""The outbox relay on a database whose default isolation is higher than READ COMMITTED
(``ALTER DATABASE ... SET default_transaction_isolation``, or a role's setting).

A claim is a transaction held open while its batch publishes, and relays side by side read
and mark rows next to each other's. Under SERIALIZABLE two such claims form a read/write
cycle, and the later to commit failed (40001): its marks were lost and its whole batch
published again, at every such overlap; under REPEATABLE READ a claim's scan failed whenever
it met a row another relay had just marked. The relay's sessions now set READ COMMITTED
themselves, as they set their idle timeout.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping

import asyncpg
import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.stores.outbox import Outbox, OutboxRelay
from tests.stores._outbox_support import PG_URL, RefusingBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
async def serializable_db(anyio_backend: object) -> AsyncIterator[str]:
    """The URL of a database of its own whose sessions default to SERIALIZABLE."""
    name = f"oncely_ser_{os.getpid()}_{id(anyio_backend) % 100000}"
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = 'serializable'"
        )
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


class Gated(RefusingBroker):
    """Publishes once ``gate`` is set; ``waiting`` is set when a publish waits for it."""

    def __init__(self, inner: MemoryBroker) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        self.waiting.set()
        await self.gate.wait()
        return await super().publish(topic, body, headers=headers, message_id=message_id)


async def test_two_claims_side_by_side_both_commit_their_marks(serializable_db: str) -> None:
    first, second = (Outbox.from_url(serializable_db, table="ob") for _ in range(2))
    await first.migrate()
    user = await asyncpg.connect(serializable_db)
    try:
        for n in range(4):
            await first.add(user, "t", {"n": n})
    finally:
        await user.close()
    inner = MemoryBroker()
    gated = Gated(inner)
    relays = [OutboxRelay(first, gated, batch=2), OutboxRelay(second, inner, batch=2)]
    async with inner, first, second:
        # The first claim holds rows 1 and 2 open while their publishes wait; the second
        # claims, publishes, marks and commits rows 3 and 4 meanwhile; then the first goes on.
        held = asyncio.create_task(relays[0].relay_once())
        await gated.waiting.wait()
        assert await relays[1].relay_once() == (2, 2, 0, 0)
        gated.gate.set()
        assert await held == (2, 2, 0, 0)
        assert await first.pending() == 0
