"""The store conformance suite's fixtures and helpers; the cases build on ``StoreCases``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar

import anyio
import pytest

from oncely.stores.base import (
    IdempotencyStore,
    Outcome,
    StoreTransaction,
    TransactionalStore,
)

StoreFactory = Callable[[], IdempotencyStore]
"""Builds a new, unconnected store; every store one factory builds shares the same keys."""

LONG = 30.0
"""A lease or ttl no test outlives."""


@dataclass(frozen=True, slots=True)
class StoreFeatures:
    """What a store can do; decides which conformance cases run.

    Attributes:
        transactional: it is a ``TransactionalStore``; run the transaction cases.
        multiprocess: stores in different processes share keys; run the multi-process race.
        timing_slack: extra seconds the suite waits past a lease or ttl before it expects the
            store to have expired it (raise it for stores with coarse or remote clocks).
    """

    transactional: bool = False
    multiprocess: bool = False
    timing_slack: float = 0.15


class _Boom(Exception):
    """A handler failure."""


class StoreCases:
    """Fixtures and helpers of the store conformance cases."""

    features: ClassVar[StoreFeatures] = StoreFeatures()

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        """Override: return a callable that builds a new, unconnected store."""
        raise NotImplementedError(f"{type(self).__name__} must provide a store_factory fixture")

    @pytest.fixture
    async def store(
        self, store_factory: StoreFactory, anyio_backend: object
    ) -> AsyncIterator[IdempotencyStore]:
        async with store_factory() as store:
            yield store

    @pytest.fixture
    async def other(
        self, store_factory: StoreFactory, anyio_backend: object
    ) -> AsyncIterator[IdempotencyStore]:
        """A second store on the same keys: another worker."""
        async with store_factory() as other:
            yield other

    @pytest.fixture
    def key(self) -> str:
        return f"key-{uuid.uuid4().hex}"

    async def write_effect(self, tx: StoreTransaction, marker: str) -> None:
        """Override for transactional stores: write ``marker`` through ``tx.connection``, as a
        handler writes to its own tables."""
        raise NotImplementedError(f"{type(self).__name__} must override write_effect")

    async def effect_visible(self, store: IdempotencyStore, marker: str) -> bool:
        """Override for transactional stores: whether ``marker`` is committed, read through
        a connection of its own."""
        raise NotImplementedError(f"{type(self).__name__} must override effect_visible")

    async def expire(self, seconds: float) -> None:
        """Wait until a lease or ttl of ``seconds``, set just before, has run out."""
        await anyio.sleep(seconds + self.features.timing_slack)

    def transactional(self, store: IdempotencyStore) -> TransactionalStore:
        assert isinstance(store, TransactionalStore)
        return store

    async def own(self, store: IdempotencyStore, key: str, lease: float = LONG) -> str:
        """Take ``key``, which must be free, and return the lease token."""
        begun = await store.begin(key, "fp", lease)
        assert begun.outcome is Outcome.NEW and begun.token, begun
        return begun.token

    async def taken_over(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> tuple[str, str]:
        """``store`` takes ``key``, its lease runs out, ``other`` takes it over.

        Returns:
            The stale token and the new owner's token.
        """
        stale = await self.own(store, key, 0.2)
        await self.expire(0.2)
        fresh = await self.own(other, key)
        assert fresh != stale
        return stale, fresh
