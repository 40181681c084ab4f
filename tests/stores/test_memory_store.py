"""Memory-store behaviour beyond the conformance suite: URLs, naming, purging."""

from __future__ import annotations

import uuid

import anyio
import pytest

from oncely.errors import ConfigError, LeaseLost
from oncely.stores import memory as memory_module
from oncely.stores.base import Begin, Outcome
from oncely.stores.memory import MemoryStore
from oncely.stores.registry import store_from_url

LONG = 30.0


@pytest.fixture
def name() -> str:
    return f"mem-{uuid.uuid4().hex}"


async def held_token(store: MemoryStore, key: str) -> str:
    begun = await store.begin(key, "fp", LONG)
    assert begun.outcome is Outcome.NEW and begun.token
    return begun.token


@pytest.mark.anyio
async def test_named_stores_share_keys(name: str) -> None:
    async with (
        MemoryStore.from_url(f"memory://{name}") as a,
        store_from_url(f"memory://{name}") as b,
    ):
        assert isinstance(b, MemoryStore)
        assert (a.name, a.url) == (name, f"memory://{name}")
        await held_token(a, "k")
        assert (await b.begin("k", "fp", LONG)).outcome is Outcome.IN_PROGRESS


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["memory://", "memory:///"])
async def test_unnamed_stores_are_private(url: str) -> None:
    async with MemoryStore.from_url(url) as a, MemoryStore.from_url(url) as b, MemoryStore() as c:
        assert a.name is None and a.url == "memory://"
        await held_token(a, "k")
        assert (await b.begin("k", "fp", LONG)).outcome is Outcome.NEW
        assert (await c.begin("k", "fp", LONG)).outcome is Outcome.NEW


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://x", "not a memory URL: 'redis://x'"),
        (
            "memory://a/b",
            "memory store URL 'memory://a/b' has a path; write memory:// or memory://name",
        ),
        ("memory://a?ttl=1", "memory store URL 'memory://a?ttl=1' takes no options"),
        (
            "memory://user@a",
            "memory store URL 'memory://user@a': the name may only contain letters, "
            "digits and -._~",
        ),
        (
            "memory://a:1",
            "memory store URL 'memory://a:1': the name may only contain letters, digits and -._~",
        ),
    ],
)
def test_bad_urls_are_rejected_precisely(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MemoryStore.from_url(url)
    assert str(caught.value) == message


def test_purge_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="purge_interval must be > 0, got 0"):
        MemoryStore(purge_interval=0)


@pytest.mark.anyio
async def test_expired_but_untaken_lease_still_completes() -> None:
    async with MemoryStore() as store:
        begun = await store.begin("k", "fp", 0.1)
        assert begun.token
        await anyio.sleep(0.25)  # not synchronisation: the 0.1 s lease under test runs out
        await store.renew("k", begun.token, LONG)
        await store.complete("k", begun.token, b"late", LONG)
        assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"late")


@pytest.mark.anyio
async def test_purge_drops_expired_results_and_dead_leases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with MemoryStore(purge_interval=LONG) as store:
        await store.complete("short", await held_token(store, "short"), b"r", 0.1)
        await store.complete("long", await held_token(store, "long"), b"r", LONG)
        kept = await store.begin("expired-lease", "fp", 0.1)  # within the stale grace
        monkeypatch.setattr(memory_module, "STALE_LEASE_GRACE", 0.0)
        dead = await store.begin("dead-lease", "fp", 0.1)
        assert kept.token and dead.token
        await anyio.sleep(0.25)  # not synchronisation: the 0.1 s deadlines under test pass
        assert await store.purge() == 2
        assert await store.purge() == 0
        await store.renew("expired-lease", kept.token, LONG)
        with pytest.raises(LeaseLost):
            await store.renew("dead-lease", dead.token, LONG)


@pytest.mark.anyio
@pytest.mark.parametrize(("interval", "left_for_purge"), [(0.1, 0), (LONG, 1)])
async def test_begin_sweeps_lazily(interval: float, left_for_purge: int) -> None:
    async with MemoryStore(purge_interval=interval) as store:
        await store.complete("old", await held_token(store, "old"), b"r", 0.05)
        await anyio.sleep(0.2)  # not synchronisation: the 0.05 s TTL (and 0.1 s interval) pass
        await store.begin("new", "fp", LONG)  # sweeps "old" only if the interval passed
        assert await store.purge() == left_for_purge
