"""Conformance cases: a ``TransactionalStore``'s transactions."""

from __future__ import annotations

import contextlib
import uuid

import anyio
import pytest

from oncely.errors import LeaseLost
from oncely.stores.base import (
    Begin,
    IdempotencyStore,
    Outcome,
)
from oncely.testing._select import requires
from oncely.testing._store_base import LONG, StoreCases, _Boom


class TransactionCases(StoreCases):
    """A transaction commits the handler's effect and the completion together, or neither."""

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
