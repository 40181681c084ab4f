"""Which backends the runtime settles a success with on the delivery's own task (``whole``):
only those whose class vouches for the method that runs (``Broker.ack_on_caller``,
``IdempotencyStore.complete_on_caller``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.runtime._finish import vouched
from oncely.stores.memory import MemoryStore
from oncely.stores.postgres import PostgresStore
from oncely.stores.redis import RedisStore
from oncely.stores.sqlite import SqliteStore
from tests.runtime._faulty import WrappedBroker


class TimedStore(MemoryStore):
    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        async with asyncio.timeout(1):  # cancels its caller's task when it fires
            await super().complete(key, token, result, ttl)


class VouchedAgain(TimedStore):
    complete_on_caller: ClassVar[bool] = True


def test_the_shipped_backends_vouch_for_their_own_settles(tmp_path: Path) -> None:
    brokers = (MemoryBroker(), SqliteBroker(tmp_path / "b.db"), AmqpBroker("amqp://127.0.0.1/"))
    for broker in brokers:
        assert vouched(broker, "ack_on_caller", "consume")
    stores = (
        MemoryStore(),
        SqliteStore(tmp_path / "s.db"),
        RedisStore(),
        PostgresStore("postgresql://127.0.0.1/x"),
    )
    for store in stores:
        assert vouched(store, "complete_on_caller", "complete")


def test_a_subclass_that_overrides_the_method_vouches_for_nothing_until_it_says_so() -> None:
    assert not vouched(TimedStore(), "complete_on_caller", "complete")
    assert vouched(VouchedAgain(), "complete_on_caller", "complete")
    # A wrapper is a broker of its own: it has not vouched for the deliveries it hands out.
    assert not vouched(WrappedBroker(MemoryBroker()), "ack_on_caller", "consume")


class CompleteOverridden(RedisStore):
    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        async with asyncio.timeout(1):
            await super().complete(key, token, result, ttl)


def test_the_chained_success_is_vouched_for_by_the_classes_that_run_it(tmp_path: Path) -> None:
    """``_chained`` (the ack waiting for the completion, ``oncely.runtime._success``) runs only
    where the broker's ``consume`` class offers ``ack_after`` and the store's ``complete``
    class offers ``complete_soon``: a store that overrides ``complete`` keeps its own."""
    assert vouched(AmqpBroker("amqp://127.0.0.1/"), "acks_after", "consume")
    for broker in (MemoryBroker(), SqliteBroker(tmp_path / "b.db"), WrappedBroker(MemoryBroker())):
        assert not vouched(broker, "acks_after", "consume")
    assert vouched(RedisStore(), "completes_soon", "complete")
    assert vouched(PostgresStore("postgresql://127.0.0.1/x"), "completes_soon", "complete")
    for store in (MemoryStore(), SqliteStore(tmp_path / "s.db"), CompleteOverridden()):
        assert not vouched(store, "completes_soon", "complete")
