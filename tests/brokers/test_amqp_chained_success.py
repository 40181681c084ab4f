"""The runtime's chained success on RabbitMQ (``oncely.runtime._success``): with the Redis or
PostgreSQL store, a handler's success is acked with its completion as the ack's condition.
A completion that fails withholds the ack; the runtime records it again and then acks, as
when it awaits the completion first. Real RabbitMQ, Redis and PostgreSQL; the failure is one
failed future handed out by a store subclass, the rest of the store is the real one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

import msgspec
import pytest

import oncely
from oncely.brokers.amqp import AmqpBroker
from oncely.errors import StoreUnavailable
from oncely.runtime.codec import fingerprint
from oncely.stores.base import IdempotencyStore, Outcome
from oncely.stores.postgres import PostgresStore
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, delete_topology, nothing_within
from tests.stores._redis_support import REDIS_URL, with_options

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]

POSTGRES_URL = "postgresql://oncely:oncely@127.0.0.1:5432/oncely"


class _FirstFails:
    """``complete_soon`` fails its first call, on every key: a store outage for one call."""

    completes_soon: ClassVar[bool] = True
    soon_calls: int

    def complete_soon(
        self, key: str, token: str, result: bytes | None, ttl: float
    ) -> asyncio.Future[None]:
        self.soon_calls += 1
        if self.soon_calls == 1:
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(StoreUnavailable("the store is down for this one call"))
            return failed
        soon: asyncio.Future[None] = super().complete_soon(key, token, result, ttl)  # type: ignore[misc]
        return soon


class FlakyRedis(_FirstFails, RedisStore):
    soon_calls = 0


class FlakyPostgres(_FirstFails, PostgresStore):
    soon_calls = 0


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


def _store(kind: str, unique: str) -> IdempotencyStore:
    if kind == "redis":
        return FlakyRedis(with_options(REDIS_URL, prefix=f"{unique}:"))
    return FlakyPostgres(POSTGRES_URL)  # keys unique to this test (below)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_withheld_ack_is_recorded_again_then_acked(
    topic: str, unique: str, kind: str
) -> None:
    store = _store(kind, unique)
    app = oncely.App()
    ran: list[int] = []

    @app.handler(topic, concurrency=4, idempotent=True)
    async def handle(n: int) -> None:
        ran.append(n)

    try:
        async with oncely.Worker(app, broker=AMQP_URL, store=store) as worker:
            (runner,) = worker._runners
            assert runner._chain  # the path under test
            for i in range(3):
                await app.publish(topic, i, key=f"{unique}-{i}")
            await eventually(lambda: worker.stats.acked == 3)
            stats = worker.stats
            assert (stats.processed, stats.complete_retries, stats.unrecorded) == (3, 1, 0)
            assert stats.settle_errors == 0
            # Every completion stands.
            for i in range(3):
                key, fp = f"{runner.spec.name}:{unique}-{i}", fingerprint(msgspec.json.encode(i))
                assert (await store.begin(key, fp, 30)).outcome is Outcome.COMPLETED
    finally:
        await store.aclose()  # a store passed in is the caller's to close
    assert sorted(ran) == [0, 1, 2]
    assert isinstance(store, _FirstFails) and store.soon_calls == 4  # 3 + the retry
    # Nothing comes back from the queue.
    async with (
        AmqpBroker(AMQP_URL) as broker,
        broker.consume(topic, prefetch=5, visibility=30) as sub,
    ):
        await nothing_within(sub, 0.5)
