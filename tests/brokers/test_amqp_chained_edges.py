"""The chained success on RabbitMQ (``oncely.runtime._success``) on the paths its own tests
leave out, both ack modes: a shutdown that cancels the delivery's task while the ack batch
waits for the completion's reply, and a completion the store answers with ``LeaseLost``.
Real RabbitMQ and Redis; the only change to the store is a gate on its first completion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import oncely
from oncely.brokers.amqp import AmqpBroker
from oncely.errors import StoreUnavailable
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, delete_topology, nothing_within
from tests.stores._redis_support import CLUSTER_URL, REDIS_URL, with_options

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]

ACK_MODES = [AMQP_URL, f"{AMQP_URL}?batch_acks=0"]


class GatedRedis(RedisStore):
    """The first completion's outcome is held back until ``gate`` is resolved (its error
    replaces the real outcome); the completion itself is sent to Redis at once."""

    gate: asyncio.Future[None] | None = None
    _relay: asyncio.Task[None] | None = None

    def complete_soon(
        self, key: str, token: str, result: bytes | None, ttl: float
    ) -> asyncio.Future[None]:
        real = super().complete_soon(key, token, result, ttl)
        if self.gate is not None:
            return real
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        held: asyncio.Future[None] = loop.create_future()
        self.gate = gate

        async def relay() -> None:
            outcome: Any = await asyncio.gather(real, return_exceptions=True)
            try:
                await gate
            except Exception as exc:
                held.set_exception(exc)
                return
            if isinstance(outcome[0], BaseException):
                held.set_exception(outcome[0])
            else:
                held.set_result(None)

        self._relay = asyncio.ensure_future(relay())
        return held


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def _nothing_left(topic: str) -> None:
    async with AmqpBroker(AMQP_URL) as broker:
        async with broker.consume(topic, prefetch=5, visibility=30) as sub:
            await nothing_within(sub, 0.5)


@pytest.mark.parametrize("url", ACK_MODES, ids=["batched", "one_by_one"])
@pytest.mark.parametrize("fails", [False, True], ids=["recorded", "withheld"])
async def test_a_stop_while_the_ack_waits_for_the_completion_settles_it_whole(
    topic: str, unique: str, url: str, fails: bool
) -> None:
    store = GatedRedis(with_options(REDIS_URL, prefix=f"{unique}:"))
    app = oncely.App()

    @app.handler(topic, concurrency=2, idempotent=True)
    async def handle(n: int) -> None:
        pass

    try:
        worker = oncely.Worker(app, broker=url, store=store)
        await worker.start()
        (runner,) = worker._runners
        assert runner._chain
        await app.publish(topic, 1, key=f"{unique}-1")
        await eventually(lambda: store.gate is not None)
        stopping = asyncio.ensure_future(worker.stop(grace=0))
        # The delivery's task is cancelled at once: its settle runs on, handed off.
        await eventually(lambda: bool(runner._finish.handed))
        assert not stopping.done()
        assert store.gate is not None
        if fails:
            store.gate.set_exception(StoreUnavailable("redis is down for this one reply"))
        else:
            store.gate.set_result(None)
        await asyncio.wait_for(stopping, 10)
        stats = worker.stats
        assert (stats.acked, stats.processed, stats.settle_errors) == (1, 1, 0)
        assert (stats.complete_retries, stats.unrecorded) == (int(fails), 0)
    finally:
        await store.aclose()
    await _nothing_left(topic)


@pytest.mark.parametrize("url", ACK_MODES, ids=["batched", "one_by_one"])
@pytest.mark.parametrize("redis_url", [REDIS_URL, CLUSTER_URL], ids=["standalone", "cluster"])
async def test_a_lost_lease_withholds_the_ack_then_acks_it_as_unrecorded(
    topic: str, unique: str, url: str, redis_url: str
) -> None:
    store = RedisStore(with_options(redis_url, prefix=f"{unique}:"))
    await store.connect()
    raw = store._checked()  # the store's own client: a Cluster's routes by the key's slot
    app = oncely.App()
    names: list[str] = []

    @app.handler(topic, concurrency=2, idempotent=True)
    async def handle(n: int) -> None:
        # Another worker took the key over meanwhile: its token is on the key now.
        await raw.hset(store.redis_key(f"{names[0]}:{unique}-1"), "t", "another-worker")

    try:
        async with oncely.Worker(app, broker=url, store=store) as worker:
            (runner,) = worker._runners
            assert runner._chain
            names.append(runner.spec.name)
            await app.publish(topic, 1, key=f"{unique}-1")
            await eventually(lambda: worker.stats.acked + worker.stats.internal_errors >= 1)
            stats = worker.stats
            assert (stats.acked, stats.processed, stats.unrecorded) == (1, 1, 1)
            assert (stats.complete_retries, stats.store_errors, stats.settle_errors) == (0, 0, 0)
    finally:
        await store.aclose()
    await _nothing_left(topic)
