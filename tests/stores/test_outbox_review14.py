"""Outbox fixes found in review 14: a row the broker refuses for good must not make the relay
take the broker for down."""

from __future__ import annotations

import msgspec
import pytest

from oncely.brokers.memory import MemoryBroker
from oncely.stores.outbox import OutboxRelay
from tests._wait import eventually
from tests.stores._outbox_support import RefusingBroker, UserDb, db
from tests.stores.test_outbox import take

pytestmark = pytest.mark.anyio

__all__ = ["db"]  # the fixture (from _outbox_support), used by name


async def test_a_row_refused_again_does_not_pause_the_relay_for_every_other_key(
    db: UserDb,
) -> None:
    """A row the broker refuses for good (too big, a topic it rejects) is retried on its own
    backoff for ever. Each retry was a batch in which nothing got through, which the relay took
    for a broker outage: it paused (up to ``retry_cap``) deaf to new rows, and, its pause
    doubling with the row's backoff, woke each time just to retry that row. Every other key's
    rows then waited out the pause instead of going at once. A row that failed before and
    fails again says nothing about the broker: its own backoff spaces its retries."""
    ob = db.outbox
    async with db.transaction() as conn:
        await ob.add(conn, "poison", {"n": 0}, key="k1")
    # It failed before (another relay, an earlier run) and is due for a retry now.
    await db.conn.execute(f"UPDATE {ob.table} SET attempts = 3, last_error = 'refused'")
    broker = RefusingBroker(MemoryBroker(), refuse={"poison"})
    # A pause would last 600 s, and so does the row's own backoff after this retry.
    relay = OutboxRelay(ob, broker, poll=30.0, retry_base=600.0, retry_cap=600.0)
    async with broker, relay:
        await eventually(lambda: broker.refused == 1)
        # Waiting for new rows (a notification, or an add in this process), not paused.
        await eventually(lambda: relay.idle)
        async with broker.consume("ok", prefetch=10, visibility=30) as sub:
            async with db.transaction() as conn:
                await ob.add(conn, "ok", {"n": 1}, key="k2")
            (delivery,) = await take(sub, 1, within=15.0)  # a pause would last 600 s
            assert msgspec.json.decode(delivery.body) == {"n": 1}
        assert broker.refused == 1
