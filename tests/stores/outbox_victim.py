"""A relay process that is certain to die between confirm and mark, for the outbox tests.

``python -m tests.stores.outbox_victim DB_URL TABLE BROKER_URL BATCH CONFIRM`` relays as
``oncely outbox relay`` does, through a real broker, except that only the first ``CONFIRM``
publishes go through: every later one blocks for ever, so the batch holding the cut-off never
finishes (its first rows confirmed by the broker, none of them marked sent). Once the
``CONFIRM``-th publish is confirmed it prints ``CONFIRMED`` and waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping

from oncely.brokers.base import Broker, Subscription
from oncely.brokers.registry import broker_from_url
from oncely.stores.outbox import Outbox, OutboxRelay


class StallingBroker(Broker):
    def __init__(self, inner: Broker, confirm: int) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.url = inner.url
        self.left = confirm
        self.confirmed = 0
        self.target = confirm

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        if self.left <= 0:
            await asyncio.Event().wait()
        self.left -= 1
        mid = await self.inner.publish(
            topic, body, headers=headers, message_id=message_id, delay=delay
        )
        self.confirmed += 1
        if self.confirmed == self.target:
            print("CONFIRMED", flush=True)  # noqa: T201
        return mid

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        return self.inner.consume(topic, prefetch=prefetch, visibility=visibility)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def main(db: str, table: str, broker_url: str, batch: int, confirm: int) -> None:
    broker = StallingBroker(broker_from_url(broker_url), confirm)
    relay = OutboxRelay(Outbox.from_url(db, table=table), broker, batch=batch, poll=0.2)
    await relay.run()


if __name__ == "__main__":
    db, table, broker_url, batch, confirm = sys.argv[1:6]
    asyncio.run(main(db, table, broker_url, int(batch), int(confirm)))
