"""The PostgreSQL store's mixed batches: ``begin`` and ``complete`` calls that arrive together
share one statement, and still each get the answer they would get alone."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from oncely.errors import LeaseLost, StoreError, StoreUnavailable
from oncely.stores.base import Begin, Outcome
from oncely.stores.postgres import PostgresStore
from tests.stores._outbox_support import FaultProxy

URL = os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely")
LONG = 30.0


@pytest.fixture
async def store(unique: str, anyio_backend: object) -> AsyncIterator[PostgresStore]:
    table = f"oncely_{unique.replace('-', '_')}"
    async with PostgresStore.from_url(f"{URL}?table={table}&pool_max=4") as store:
        yield store
    conn = await asyncpg.connect(URL)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


async def own(store: PostgresStore, key: str) -> str:
    begun = await store.begin(key, "fp", LONG)
    assert begun.outcome is Outcome.NEW and begun.token, begun
    return begun.token


@pytest.mark.anyio
async def test_completes_and_begins_that_arrive_together_share_one_statement(
    store: PostgresStore,
) -> None:
    old = [f"old{i}" for i in range(40)]
    tokens = await asyncio.gather(*(own(store, k) for k in old))
    await store.complete("done-before", await own(store, "done-before"), b"r0", LONG)
    with mock.patch.object(store, "_fetch", wraps=store._fetch) as fetches:
        completes = [
            store.complete(k, t, k.encode(), LONG) for k, t in zip(old, tokens, strict=True)
        ]
        begins = [store.begin(f"new{i}", "fp", LONG) for i in range(40)]
        again = [store.begin("done-before", "fp", LONG), store.begin("old3x", "other", LONG)]
        got: list[Any] = await asyncio.gather(*completes, *begins, *again)
        assert fetches.call_count == 1, fetches.call_count
    assert got[:40] == [None] * 40
    assert {b.outcome for b in got[40:80]} == {Outcome.NEW}
    assert got[80] == Begin(Outcome.COMPLETED, result=b"r0")
    assert got[81].outcome is Outcome.NEW
    for key in old:
        assert await store.begin(key, "fp", LONG) == Begin(Outcome.COMPLETED, result=key.encode())


@pytest.mark.anyio
async def test_a_begin_of_a_key_completed_in_the_same_batch_finds_it_completed(
    store: PostgresStore,
) -> None:
    token = await own(store, "k")
    done, begun, mismatch = await asyncio.gather(
        store.complete("k", token, b"r", LONG),
        store.begin("k", "fp", LONG),
        store.begin("k", "other fp", LONG),
    )
    assert done is None
    assert begun == Begin(Outcome.COMPLETED, result=b"r")
    assert mismatch == Begin(Outcome.MISMATCH)


@pytest.mark.anyio
async def test_a_stale_completion_fails_alone_in_a_mixed_batch(store: PostgresStore) -> None:
    good, stale = await own(store, "good"), await own(store, "stale")
    got = await asyncio.gather(
        store.complete("good", good, None, LONG),
        store.complete("stale", stale + "x", None, LONG),
        store.complete("good", good, None, LONG),  # re-sent: ordered after the first
        store.begin("fresh", "fp", LONG),
        store.complete("good", good + "x", None, LONG),  # not its token: after them too
        return_exceptions=True,
    )
    assert got[0] is None
    assert isinstance(got[1], LeaseLost)
    assert got[2] is None  # completed by this very token: recorded, not a lost lease
    assert isinstance(got[3], Begin) and got[3].outcome is Outcome.NEW
    assert isinstance(got[4], LeaseLost)
    assert (await store.begin("stale", "fp", LONG)).outcome is Outcome.IN_PROGRESS


@pytest.mark.anyio
async def test_a_failed_mixed_statement_fails_every_call_it_carried(
    store: PostgresStore, unique: str
) -> None:
    # The same table through a TCP proxy whose connections are then cut: a real failure.
    target = urlsplit(URL)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    netloc = f"{target.username}:{target.password}@127.0.0.1:{proxy.listen_port}"
    table = f"oncely_{unique.replace('-', '_')}"
    proxied_url = urlunsplit(target._replace(netloc=netloc, query=f"table={table}&pool_max=2"))
    try:
        async with PostgresStore.from_url(f"{proxied_url}&command_timeout=2") as proxied:
            token = await own(proxied, "k")
            proxy.cut()
            got = await asyncio.gather(
                proxied.complete("k", token, b"r", LONG),
                proxied.begin("other", "fp", LONG),
                return_exceptions=True,
            )
            assert [type(g) for g in got] == [StoreUnavailable, StoreUnavailable], got
    finally:
        await proxy.aclose()
    # Nothing was committed: the key is still ours to complete, the other still free.
    await store.complete("k", token, b"r", LONG)
    assert (await store.begin("other", "fp", LONG)).outcome is Outcome.NEW


@pytest.mark.anyio
async def test_a_key_utf8_cannot_carry_fails_alone(store: PostgresStore) -> None:
    # A lone surrogate (e.g. from a JSON "\\ud800" escape) has no UTF-8 form.
    good, bad = await asyncio.gather(
        store.begin("good", "fp", LONG),
        store.begin("bad\ud800", "fp", LONG),
        return_exceptions=True,
    )
    assert isinstance(bad, StoreError) and "cannot be encoded" in str(bad), repr(bad)
    assert not isinstance(bad, StoreUnavailable)
    assert not isinstance(good, BaseException), repr(good)
    assert good.outcome is Outcome.NEW and good.token is not None
    await store.complete("good", good.token, None, LONG)
