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

import contextlib
import importlib
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from oncely.errors import LeaseLost, StoreUnavailable
from oncely.stores.base import (
    Begin,
    IdempotencyStore,
    Outcome,
    StoreTransaction,
    TransactionalStore,
)
from oncely.testing._select import drop_inapplicable, requires

if TYPE_CHECKING:
    from anyio.abc import Process

__all__ = ["StoreConformance", "StoreFactory", "StoreFeatures"]

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


class StoreConformance:
    """The cases every ``IdempotencyStore`` must pass; subclass it per store."""

    features: ClassVar[StoreFeatures] = StoreFeatures()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        drop_inapplicable(cls, cls.features)

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
            reports = await _hammer_in_processes(store, keys, processes=4, lease=600.0)
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

    # -- transactional mode -------------------------------------------------------------------

    @pytest.mark.anyio
    @pytest.mark.parametrize("result", [b"done", None], ids=repr)
    @requires(transactional=True)
    async def test_transaction_commits_effect_and_completion_together(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str, result: bytes | None
    ) -> None:
        tstore = self.transactional(store)
        marker = uuid.uuid4().hex
        async with tstore.transaction(key, await self.own(tstore, key), LONG) as tx:
            await self.write_effect(tx, marker)
            assert not await self.effect_visible(tstore, marker), "visible before commit"
            if result is not None:  # None: the handler returned nothing, tx.result untouched
                tx.result = result
        assert await self.effect_visible(tstore, marker)
        assert await other.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=result)

    @pytest.mark.anyio
    @requires(transactional=True)
    async def test_transaction_error_rolls_back_both_and_keeps_the_lease(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        """Design: a failed transaction leaves the lease with its owner, who decides whether
        to release it (retry at once) or let it run out."""
        tstore = self.transactional(store)
        token = await self.own(tstore, key)
        marker = uuid.uuid4().hex
        with pytest.raises(_Boom):
            async with tstore.transaction(key, token, LONG) as tx:
                await self.write_effect(tx, marker)
                tx.result = b"never"
                raise _Boom
        assert not await self.effect_visible(tstore, marker)
        assert (await other.begin(key, "fp", LONG)).outcome is Outcome.IN_PROGRESS
        await tstore.renew(key, token, LONG)
        await tstore.release(key, token)
        await self.own(other, key)

    @pytest.mark.anyio
    @requires(transactional=True)
    async def test_transaction_with_a_lost_lease_rolls_back_and_raises(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        tstore = self.transactional(store)
        stale, fresh = await self.taken_over(tstore, other, key)
        marker = uuid.uuid4().hex
        with pytest.raises(LeaseLost):  # on entry or on exit, as the store can tell
            async with tstore.transaction(key, stale, LONG) as tx:
                await self.write_effect(tx, marker)
                tx.result = b"stale"
        assert not await self.effect_visible(tstore, marker)
        assert (await tstore.begin(key, "fp", LONG)).outcome is Outcome.IN_PROGRESS
        await other.complete(key, fresh, b"fresh", LONG)
        assert await tstore.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=b"fresh")

    @pytest.mark.anyio
    @requires(transactional=True)
    async def test_takeover_racing_an_open_transaction_has_one_winner(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        """The lease runs out while the transaction is open and another worker asks for the
        key: either the transaction commits and the other sees COMPLETED, or the transaction
        raises LeaseLost with its effect gone and the other owns the key. Never both."""
        tstore = self.transactional(store)
        token = await self.own(tstore, key, 0.3)
        marker = uuid.uuid4().hex
        taken: list[Begin] = []

        async def take_over() -> None:
            taken.append(await other.begin(key, "fp", LONG))

        committed = False
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                with contextlib.suppress(LeaseLost):
                    async with tstore.transaction(key, token, LONG) as tx:
                        await self.write_effect(tx, marker)
                        await self.expire(0.3)
                        tg.start_soon(take_over)
                        await anyio.wait_all_tasks_blocked()  # the other is in its begin
                        tx.result = b"tx"
                    committed = True
        [found] = taken
        if committed:
            assert found == Begin(Outcome.COMPLETED, result=b"tx")
        else:
            assert found.outcome is Outcome.NEW
        assert await self.effect_visible(tstore, marker) is committed

    @pytest.mark.anyio
    @requires(transactional=True)
    async def test_heartbeat_renews_during_an_open_transaction(
        self, store: IdempotencyStore, other: IdempotencyStore, key: str
    ) -> None:
        """The heartbeat keeps renewing while a transaction runs longer than the lease; no
        renew may block on the transaction, and the transaction still commits."""
        tstore = self.transactional(store)
        token = await self.own(tstore, key, 0.3)
        stop = anyio.Event()
        renewed = 0

        async def heartbeat() -> None:
            nonlocal renewed
            while not stop.is_set():
                try:
                    with anyio.fail_after(1):
                        await tstore.renew(key, token, 0.3)
                except LeaseLost:
                    assert stop.is_set(), "lease lost while the transaction was open"
                    return
                renewed += 1
                await anyio.sleep(0.05)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                async with tstore.transaction(key, token, LONG) as tx:
                    await self.write_effect(tx, uuid.uuid4().hex)
                    await anyio.sleep(0.6)  # twice the lease
                    tx.result = b"ok"
                    stop.set()
        assert renewed >= 3
        assert await other.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=b"ok")


# -- the multi-process race -------------------------------------------------------------------

_CHILD = "from oncely.testing.stores import _hammer_child; _hammer_child()"


async def _hammer_in_processes(
    store: IdempotencyStore, keys: list[str], *, processes: int, lease: float
) -> list[dict[str, Any]]:
    """Run ``begin`` on every key in each of ``processes`` child processes at once.

    Each child rebuilds the store from ``type(store).from_url(store.url)``, connects, and
    waits for a "go" line, so that all of them race on the same keys in the same order.

    Returns:
        One report per child: ``{"new": [keys it got NEW for], "outcomes": {outcome: n}}``.
    """
    cls = type(store)
    spec = {"target": f"{cls.__module__}:{cls.__qualname__}", "url": store.url, "keys": keys}
    command = [sys.executable, "-c", _CHILD, json.dumps({**spec, "lease": lease})]
    # The child must import what the parent can, test-local store modules included.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    async with contextlib.AsyncExitStack() as stack:
        children = []
        for _ in range(processes):
            process = await stack.enter_async_context(await anyio.open_process(command, env=env))
            assert process.stdout is not None
            children.append((process, BufferedByteReceiveStream(process.stdout)))
        for process, stdout in children:
            await _line(process, stdout)  # "ready"
        for process, _ in children:
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
        reports: list[dict[str, Any]] = [
            json.loads(await _line(process, stdout)) for process, stdout in children
        ]
    return reports


async def _line(process: Process, stdout: BufferedByteReceiveStream) -> bytes:
    try:
        return await stdout.receive_until(b"\n", 1 << 24)
    except (anyio.IncompleteRead, anyio.EndOfStream):
        errors = b""
        if process.stderr is not None:
            with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                while True:
                    errors += await process.stderr.receive()
        message = errors.decode(errors="replace")
        raise AssertionError(f"store child process failed:\n{message}") from None


def _hammer_child() -> None:
    """The child side of ``_hammer_in_processes``; reads its spec from ``sys.argv[1]``."""
    anyio.run(_hammer, json.loads(sys.argv[1]))


async def _hammer(spec: dict[str, Any]) -> None:
    module, _, name = spec["target"].partition(":")
    cls = getattr(importlib.import_module(module), name)
    store: IdempotencyStore = cls.from_url(spec["url"])
    new: list[str] = []
    outcomes: Counter[str] = Counter()
    async with store:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for key in spec["keys"]:
            begun = await store.begin(key, "fp", spec["lease"])
            outcomes[begun.outcome.value] += 1
            if begun.outcome is Outcome.NEW:
                new.append(key)
    sys.stdout.write(json.dumps({"new": new, "outcomes": outcomes}) + "\n")
    sys.stdout.flush()
