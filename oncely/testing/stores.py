"""The conformance suite every idempotency store must pass.

Subclass ``StoreConformance`` in a test module, say what the store can do in ``features`` and
provide a ``store_factory`` fixture that returns a callable building a new, unconnected store.
Every store it builds must see the same keys (they play different workers)::

    import pytest
    from oncely.testing.stores import StoreConformance, StoreFactory, StoreFeatures

    class TestRedisStore(StoreConformance):
        features = StoreFeatures(multiprocess=True)

        @pytest.fixture
        def store_factory(self, redis_url: str) -> StoreFactory:
            return lambda: RedisStore.from_url(redis_url)

A ``transactional`` store also overrides ``write_effect`` and ``effect_visible``, which stand in
for a handler writing to its own tables. A ``multiprocess`` store must rebuild itself in a
child process from ``type(store).from_url(store.url)``. Tests are marked ``anyio``; they run on
whatever ``anyio_backend`` the project's conftest provides.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

from oncely.errors import LeaseLost, StoreUnavailable
from oncely.stores.base import (
    Begin,
    IdempotencyStore,
    Outcome,
)
from oncely.testing._select import drop_inapplicable, requires
from oncely.testing._store_base import LONG, StoreCases, StoreFactory, StoreFeatures
from oncely.testing._store_processes import hammer_in_processes
from oncely.testing._store_tx import TransactionCases

__all__ = ["StoreConformance", "StoreFactory", "StoreFeatures"]


class StoreConformance(TransactionCases, StoreCases):
    """The cases every ``IdempotencyStore`` must pass; subclass it per store."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Here, not on a mixin: a mixin's own (default) features would drop its cases for
        # every store.
        super().__init_subclass__(**kwargs)
        drop_inapplicable(cls, cls.features)

    # -- the four outcomes ----------------------------------------------------------------

    @pytest.mark.anyio
    async def test_new_grants_a_fresh_token(self, store: IdempotencyStore, key: str) -> None:
        assert await self.own(store, key) != await self.own(store, f"{key}-b")

    @pytest.mark.anyio
    async def test_live_lease_is_in_progress(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        await self.own(store, key, 5.0)
        found = await other.begin(key, "fp", 5.0)
        assert found.outcome is Outcome.IN_PROGRESS and found.token is None
        assert 0.0 < found.retry_after <= 5.0

    @pytest.mark.anyio
    @pytest.mark.parametrize("result", [b"\x00result\xff" * 100, b"", None], ids=repr)
    async def test_completed_returns_the_exact_result(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str, result: bytes | None
    ) -> None:
        await store.complete(key, await self.own(store, key), result, LONG)
        assert await other.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=result)

    @pytest.mark.anyio
    @pytest.mark.parametrize("completed", [False, True], ids=["running", "completed"])
    async def test_mismatch_on_another_fingerprint(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str, completed: bool
    ) -> None:
        token = await self.own(store, key)
        if completed:
            await store.complete(key, token, b"r", LONG)
        assert await other.begin(key, "other-fp", LONG) == Begin(Outcome.MISMATCH)

    # -- leases -------------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_expired_lease_is_taken_over(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        await self.taken_over(store, other, key)  # NEW with a different token

    @pytest.mark.anyio
    async def test_renew_keeps_the_lease_past_its_first_expiry(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        token = await self.own(store, key, 0.3)
        for _ in range(4):  # 0.4 s in all, past the first 0.3 s lease
            await anyio.sleep(0.1)
            await store.renew(key, token, 0.3)
        assert (await other.begin(key, "fp", LONG)).outcome is Outcome.IN_PROGRESS

    @pytest.mark.anyio
    async def test_stale_token_cannot_renew(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        stale, _ = await self.taken_over(store, other, key)
        with pytest.raises(LeaseLost):
            await store.renew(key, stale, LONG)

    @pytest.mark.anyio
    async def test_stale_token_cannot_complete(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        stale, fresh = await self.taken_over(store, other, key)
        with pytest.raises(LeaseLost):
            await store.complete(key, stale, b"stale", LONG)
        assert (await store.begin(key, "fp", LONG)).outcome is Outcome.IN_PROGRESS
        await other.complete(key, fresh, b"fresh", LONG)
        assert await store.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=b"fresh")

    @pytest.mark.anyio
    async def test_stale_token_release_is_a_no_op(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        stale, fresh = await self.taken_over(store, other, key)
        await store.release(key, stale)
        assert (await store.begin(key, "fp", LONG)).outcome is Outcome.IN_PROGRESS
        await other.renew(key, fresh, LONG)

    @pytest.mark.anyio
    async def test_release_lets_a_retry_take_the_key_at_once(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        token = await self.own(store, key)
        await store.release(key, token)
        await store.release(key, token)  # idempotent
        assert await self.own(other, key) != token

    @pytest.mark.anyio
    async def test_completion_ends_the_lease(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        token = await self.own(store, key)
        await store.complete(key, token, b"r", LONG)
        with pytest.raises(LeaseLost):
            await store.renew(key, token, LONG)
        await store.release(key, token)  # a late release must not forget the result
        assert await other.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")

    @pytest.mark.anyio
    async def test_result_ttl_expiry_forgets_the_key(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        await store.complete(key, await self.own(store, key), b"r", 0.2)
        await self.expire(0.2)
        again = await other.begin(key, "other-fp", LONG)  # forgotten, so no MISMATCH either
        assert again.outcome is Outcome.NEW

    # -- atomicity ----------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_exactly_one_new_among_concurrent_tasks(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        outcomes: list[Outcome] = []

        async def contend(on: IdempotencyStore) -> None:
            outcomes.append((await on.begin(key, "fp", LONG)).outcome)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(contend, store if i % 2 else other)
        assert Counter(outcomes) == {Outcome.NEW: 1, Outcome.IN_PROGRESS: 49}

    @pytest.mark.anyio
    @requires(multiprocess=True)
    async def test_exactly_one_new_among_processes(self, store: IdempotencyStore, key: str) -> None:
        keys = [f"{key}-{i}" for i in range(200)]
        with anyio.fail_after(100):
            reports = await hammer_in_processes(store, keys, processes=4, lease=600.0)
        seen: Counter[str] = Counter()
        for report in reports:
            assert set(report["outcomes"]) <= {"new", "in_progress"}, report["outcomes"]
            seen.update(report["new"])
        assert seen == Counter(keys), "every key must be NEW exactly once over all processes"

    # -- lifecycle ----------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_unconnected_or_closed_store_is_unavailable(
        self, store_factory: StoreFactory, anyio_backend: object, key: str
    ) -> None:
        store = store_factory()
        with pytest.raises(StoreUnavailable):
            await store.begin(key, "fp", LONG)
        await store.connect()
        await store.connect()  # idempotent
        await self.own(store, key)
        await store.aclose()
        await store.aclose()  # idempotent
        with pytest.raises(StoreUnavailable):
            await store.begin(key, "fp", LONG)
