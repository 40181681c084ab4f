"""A publish error whose text holds a NUL character (a driver quoting a header or a payload)
is recorded in ``last_error`` escaped: PostgreSQL's ``text`` cannot hold ``\\x00``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.errors import PublishFailed
from oncely.stores.outbox import OutboxRelay
from tests._wait import eventually
from tests.stores._outbox_support import RefusingBroker, UserDb, db
from tests.stores.test_outbox import eventually_async

pytestmark = pytest.mark.anyio

__all__ = ["db"]  # the fixture (from _outbox_support), used by name


class QuotingBroker(RefusingBroker):
    """Refuses ``poison`` with an error that quotes a raw NUL, as a third-party driver may."""

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        if topic == "poison":
            self.refused += 1
            raise PublishFailed("refused: bad byte \x00 in the record")
        return await super().publish(
            topic, body, headers=headers, message_id=message_id, delay=delay
        )


async def test_an_error_with_a_nul_is_recorded_escaped_and_the_batch_is_marked(
    db: UserDb,
) -> None:
    ob = db.outbox
    async with db.transaction() as conn:
        await ob.add(conn, "poison", {"n": 1}, key="k1")
        await ob.add(conn, "ok", {"n": 2})
    broker = QuotingBroker(MemoryBroker())
    relay = OutboxRelay(ob, broker, poll=0.05, retry_base=30, retry_cap=30)
    async with broker, relay:
        rows: list[tuple[Any, ...]] = []

        async def recorded() -> bool:
            rows[:] = await db.fetch(
                f"SELECT topic, sent_at IS NULL, last_error FROM {ob.table} ORDER BY id"
            )
            return rows[0][2] is not None

        # Before, on PostgreSQL, marking the batch failed on the NUL (the UPDATE of the
        # failure and that of the sent row are one transaction): nothing was recorded, and
        # the sent row was published again on every batch.
        await eventually_async(recorded)
        await eventually(lambda: relay.stats.published == 1)
        async with broker.consume("ok", prefetch=10, visibility=30) as sub:
            first = await asyncio.wait_for(sub.__anext__(), 5)
            await first.ack()
    assert rows[0] == ("poison", True, "PublishFailed: refused: bad byte \\x00 in the record")
    assert rows[1][:2] == ("ok", False)
    assert broker.refused == 1 and relay.stats.published == 1
