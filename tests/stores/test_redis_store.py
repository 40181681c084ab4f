"""Redis-store behaviour beyond the conformance suite: URLs and TLS options, the key layout on
a Cluster, TTLs, pipelining, script-cache loss, server errors and outages. A worker living
through a store outage is in test_redis_outage.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from oncely.errors import ConfigError, LeaseLost, StoreError, StoreUnavailable
from oncely.stores._redis_scripts import STALE_LEASE_GRACE_MS
from oncely.stores._redis_url import build_client, parse_redis_url
from oncely.stores.base import Begin, Outcome
from oncely.stores.redis import RedisStore
from oncely.stores.registry import store_from_url
from tests.stores._redis_support import (
    CLUSTER_URL,
    REDIS_URL,
    private_redis,
    reading,
    with_options,
)

LONG = 30.0

# -- URLs ---------------------------------------------------------------------------------


def test_url_defaults_and_options() -> None:
    plain = parse_redis_url("redis://127.0.0.1/")
    assert plain.nodes == (("127.0.0.1", 6379),) and plain.db == 0 and not plain.cluster
    assert (plain.prefix, plain.pool_size, plain.socket_timeout) == ("oncely:", 16, 5.0)
    full = parse_redis_url(
        "redis://me:p%40ss@cache.internal:6380/3?prefix=app:&pool_size=8"
        "&socket_timeout=0.5&connect_timeout=2"
    )
    assert full.nodes == (("cache.internal", 6380),) and full.db == 3
    assert (full.username, full.password) == ("me", "p@ss")
    assert (full.prefix, full.pool_size, full.socket_timeout, full.connect_timeout) == (
        "app:",
        8,
        0.5,
        2.0,
    )
    cluster = parse_redis_url("redis://a:7000,b:7001,[::1]:7002/?cluster=1")
    assert cluster.cluster and cluster.nodes == (("a", 7000), ("b", 7001), ("::1", 7002))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?prefx=a", "unknown option(s) prefx"),
        ("redis://h/0?pool_size=0", "pool_size must be > 0"),
        ("redis://h/0?pool_size=2.5", "is not a whole number"),
        ("redis://h/0?socket_timeout=soon", "is not a number"),
        ("redis://h/0?connect_timeout=-1", "must be > 0"),
        ("redis://h:99999/0", "port '99999'"),
        ("redis://h/zero", "database number"),
        ("redis://:6379/0", "a host is missing"),
        ("redis://a:1,b:2/0", "several hosts need cluster=1"),
        ("redis://a:1/2?cluster=1", "only db 0"),
        ("redis://h/0?cluster=maybe", "must be 1 or 0"),
        ("redis://h/0?prefix=a{b}:", "must not contain"),
        ("redis://h/0?ssl_cert_reqs=none", "needs a rediss:// (TLS) URL"),
        ("rediss://h/0?ssl_cert_reqs=sometimes", "must be one of"),
        ("rediss://h/0?ssl_ca_certs=", "needs a file path"),
        ("redis://h/0#frag", "no #fragment"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        store_from_url(url)
    assert str(caught.value).startswith(repr(url)) and message in str(caught.value)


def test_registry_builds_the_store_for_both_schemes() -> None:
    for url in ("redis://127.0.0.1:6379/0?prefix=x:", "rediss://127.0.0.1:6380/0"):
        store = store_from_url(url)
        assert isinstance(store, RedisStore) and store.url == url
    assert store_from_url(CLUSTER_URL).cluster  # type: ignore[attr-defined]


def test_prefix_goes_in_the_url_or_with_a_client() -> None:
    with pytest.raises(ConfigError, match="give the prefix in the URL"):
        RedisStore("redis://h/0", prefix="a:")
    with pytest.raises(ConfigError, match="must not contain"):
        RedisStore(Redis(), prefix="{a}")


def test_tls_options_reach_the_connection() -> None:
    """No TLS server is needed: the pool's connection class and keyword arguments are what
    redis-py opens every connection with."""
    url = (
        "rediss://me:pw@cache.example:6380/1?ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem"
        "&ssl_certfile=/etc/client.pem&ssl_keyfile=/etc/client.key&ssl_check_hostname=0"
        "&socket_timeout=0.75&pool_size=4"
    )
    options = parse_redis_url(url)
    assert options.tls and options.ssl == {
        "ssl_cert_reqs": "optional",
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/etc/client.pem",
        "ssl_keyfile": "/etc/client.key",
        "ssl_check_hostname": False,
    }
    client = build_client(options)
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection and pool.max_connections == 4
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.example", 6380, 1)
    assert kwargs["ssl_cert_reqs"] == "optional" and kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert kwargs["ssl_check_hostname"] is False and kwargs["socket_timeout"] == 0.75
    plain = build_client(parse_redis_url("redis://h/0"))
    assert isinstance(plain, Redis) and plain.connection_pool.connection_class is Connection
    cluster = build_client(parse_redis_url("rediss://a:7000,b:7001/?cluster=1&pool_size=3"))
    assert isinstance(cluster, RedisCluster)
    node_kwargs = cluster.get_nodes()[0].connection_kwargs if cluster.get_nodes() else None
    assert node_kwargs is None or node_kwargs.get("ssl_cert_reqs") == "required"


# -- key layout and TTLs --------------------------------------------------------------------


@pytest.fixture
async def store(unique: str, anyio_backend: object) -> AsyncIterator[RedisStore]:
    async with RedisStore(with_options(REDIS_URL, prefix=f"{unique}:")) as store:
        yield store


@pytest.fixture
async def cluster_store(unique: str, anyio_backend: object) -> AsyncIterator[RedisStore]:
    async with RedisStore(with_options(CLUSTER_URL, prefix=f"{unique}:")) as store:
        yield store


@pytest.fixture
async def raw(anyio_backend: object) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.mark.anyio
async def test_hash_tag_keeps_a_key_in_its_own_slot_on_the_cluster(
    cluster_store: RedisStore, unique: str
) -> None:
    client = RedisCluster.from_url(CLUSTER_URL.replace("?cluster=1", "").split(",")[0] + "/0")
    try:
        keys = [f"handler:{unique}-{i}" for i in range(30)]
        for key in keys:
            await cluster_store.begin(key, "fp", LONG)
        owners = set()
        for key in keys:
            redis_key = cluster_store.redis_key(key)
            assert redis_key == f"{unique}:{{{key}}}"
            slot = await client.cluster_keyslot(redis_key)
            # The slot is the key's alone: the prefix does not move it.
            assert slot == await client.cluster_keyslot(key)
            node = client.get_node_from_key(redis_key)
            assert node is not None
            owners.add(node.name)
            assert await client.execute_command("EXISTS", redis_key, target_nodes=node) == 1
        assert len(owners) == 3, "30 keys should spread over all three primaries"
    finally:
        await client.aclose()


async def server_ms(raw: Redis) -> int:
    seconds, micros = await raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.anyio
async def test_ttls_follow_the_lease_then_the_result_ttl(store: RedisStore, raw: Redis) -> None:
    key = store.redis_key("k")
    token = (await store.begin("k", "fp", 5.0)).token
    assert token is not None
    fields = await raw.hgetall(key)
    assert fields[b"s"] == b"r" and fields[b"t"] == token.encode() and fields[b"f"] == b"fp"
    assert 4500 <= int(fields[b"u"]) - await server_ms(raw) <= 5000
    assert 5000 + STALE_LEASE_GRACE_MS - 1000 <= await raw.pttl(key) <= 5000 + STALE_LEASE_GRACE_MS

    await store.renew("k", token, 20.0)
    assert 19000 <= int(await raw.hget(key, "u") or 0) - await server_ms(raw) <= 20000
    assert await raw.pttl(key) >= 20000 + STALE_LEASE_GRACE_MS - 1000

    await store.complete("k", token, b"out", 60.0)
    fields = await raw.hgetall(key)
    # The lease's end "u" stays, unread once "s" is "c" (one redis.call less per complete).
    assert fields[b"s"] == b"c" and fields[b"r"] == b"out" and fields[b"t"] == token.encode()
    assert 59000 <= await raw.pttl(key) <= 60000

    other = (await store.begin("k2", "fp", LONG)).token
    assert other is not None
    await store.release("k2", other)
    assert await raw.exists(store.redis_key("k2")) == 0


@pytest.mark.anyio
async def test_in_progress_retry_after_counts_down_on_the_server_clock(store: RedisStore) -> None:
    await store.begin("k", "fp", 2.0)
    first = await store.begin("k", "fp", 2.0)
    await asyncio.sleep(0.3)
    second = await store.begin("k", "fp", 2.0)
    assert first.outcome is second.outcome is Outcome.IN_PROGRESS
    assert 1.5 < first.retry_after <= 2.0 and second.retry_after <= first.retry_after - 0.25


@pytest.mark.anyio
async def test_a_slow_owner_nobody_took_over_may_still_complete(store: RedisStore) -> None:
    """As with the memory and SQLite stores: the lease ran out, but the token still owns the
    key until someone takes it over, so the effect gets recorded instead of run again."""
    token = (await store.begin("k", "fp", 0.1)).token
    assert token is not None
    await asyncio.sleep(0.25)
    await store.renew("k", token, 0.1)
    await asyncio.sleep(0.25)
    await store.complete("k", token, b"late", LONG)
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"late")


@pytest.mark.anyio
async def test_each_script_is_idempotent_for_its_token(store: RedisStore, raw: Redis) -> None:
    """redis-py re-sends a command whose reply a broken connection lost; the second run must
    answer as the first did. Simulated by running the same script twice."""
    begun = await store.begin("k", "fp", LONG)
    assert begun.token is not None
    from oncely.stores._redis_scripts import SCRIPTS

    again = await raw.evalsha(
        SCRIPTS["begin"].sha, 1, store.redis_key("k"), "fp", begun.token, 30000, 60000
    )
    assert again == [0]  # NEW again, for the same token
    await store.complete("k", begun.token, b"r", LONG)
    await store.complete("k", begun.token, b"r", LONG)  # a re-sent completion succeeds
    with pytest.raises(LeaseLost):
        await store.complete("k", "someone-else", b"x", LONG)
    assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")


# -- pipelining -------------------------------------------------------------------------------


def counting(sends: list[int]) -> type[Connection]:
    class Counting(Connection):
        """A real connection that records the port of every write it sends: one per round
        trip (counted at its stream, whichever path writes: redis-py's commands or the
        store's own batch exchange)."""

        async def _connect(self) -> None:
            await super()._connect()  # type: ignore[no-untyped-call]
            writer, port = self._writer, self.port
            assert writer is not None
            write, writelines = writer.write, writer.writelines

            def counted_write(data: bytes) -> None:
                sends.append(port)
                write(data)

            def counted_writelines(data: Any) -> None:
                sends.append(port)
                writelines(data)

            setattr(writer, "write", counted_write)  # noqa: B010 (mypy: a method)
            setattr(writer, "writelines", counted_writelines)  # noqa: B010

    return Counting


@pytest.mark.anyio
async def test_concurrent_calls_share_one_round_trip(unique: str, anyio_backend: object) -> None:
    sends: list[int] = []
    pool = BlockingConnectionPool.from_url(REDIS_URL, connection_class=counting(sends))
    async with RedisStore(Redis.from_pool(pool), prefix=f"{unique}:") as store:
        sends.clear()
        keys = [f"k{i}" for i in range(100)]
        begun = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
        assert len(sends) == 1, "100 concurrent begins should be one pipeline"
        assert {b.outcome for b in begun} == {Outcome.NEW}
        sends.clear()
        await asyncio.gather(
            *(
                store.complete(k, b.token or "", b"r", LONG)
                for k, b in zip(keys, begun, strict=True)
            )
        )
        assert len(sends) == 1, "100 concurrent completes should be one pipeline"
        sends.clear()
        for key in keys[:10]:  # one after another, nothing to share
            assert (await store.begin(key, "fp", LONG)).outcome is Outcome.COMPLETED
        assert len(sends) == 10
    await pool.aclose()


@pytest.mark.anyio
async def test_cluster_batches_one_round_trip_per_node(unique: str, anyio_backend: object) -> None:
    sends: list[int] = []
    options = parse_redis_url(CLUSTER_URL)
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in options.nodes])
    # Every node the client discovers gets its connections from these keyword arguments.
    client.nodes_manager.connection_kwargs["connection_class"] = counting(sends)
    async with RedisStore(client, prefix=f"{unique}:") as store:
        sends.clear()
        begun = await asyncio.gather(*(store.begin(f"k{i}", "fp", LONG) for i in range(90)))
        assert {b.outcome for b in begun} == {Outcome.NEW}
        assert sorted(Counter(sends).values()) == [1, 1, 1], Counter(sends)
    await client.aclose()


# -- failures -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lost_script_cache_is_reloaded_transparently(
    tmp_path: Path, anyio_backend: object
) -> None:
    async with private_redis(tmp_path) as server, RedisStore(server.url) as store:
        token = (await store.begin("k", "fp", LONG)).token
        assert token is not None
        admin = Redis(host="127.0.0.1", port=server.port)
        await admin.script_flush()
        await admin.aclose()
        await store.complete("k", token, b"r", LONG)
        assert await store.begin("k", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")


@pytest.mark.anyio
async def test_lost_script_cache_on_one_cluster_node(cluster_store: RedisStore) -> None:
    client = cluster_store._checked()
    assert isinstance(client, RedisCluster)
    node = client.get_nodes()[1]
    await client.execute_command("SCRIPT", "FLUSH", target_nodes=node)
    begun = await asyncio.gather(*(cluster_store.begin(f"k{i}", "fp", LONG) for i in range(30)))
    assert {b.outcome for b in begun} == {Outcome.NEW}


@pytest.mark.anyio
async def test_wrong_type_is_a_store_error_not_unavailable(store: RedisStore, raw: Redis) -> None:
    await raw.set(store.redis_key("k"), "not a hash")
    with pytest.raises(StoreError, match="WRONGTYPE") as caught:
        await store.begin("k", "fp", LONG)
    assert not isinstance(caught.value, StoreUnavailable)
    assert (await store.begin("other", "fp", LONG)).outcome is Outcome.NEW  # others unharmed


@pytest.mark.anyio
async def test_unreachable_server_is_unavailable(anyio_backend: object) -> None:
    from tests.stores._redis_support import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0?connect_timeout=1")
    with pytest.raises(StoreUnavailable, match="redis connect"):
        await store.connect()
    with pytest.raises(StoreUnavailable, match="not connected"):
        await store.begin("k", "fp", LONG)


@pytest.mark.anyio
async def test_killed_hung_and_returning_server(tmp_path: Path, anyio_backend: object) -> None:
    async with private_redis(tmp_path) as server:
        url = with_options(server.url, socket_timeout=0.5)
        async with RedisStore(url) as store:
            assert (await store.begin("a", "fp", LONG)).outcome is Outcome.NEW
            server.pause()  # hung: connections open, no answers
            # The socket timeout ends the wait: were it ignored, the bound would fail the test.
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await asyncio.wait_for(store.begin("b", "fp", LONG), 30)
            server.resume()
            assert (await store.begin("c", "fp", LONG)).outcome is Outcome.NEW
            await server.kill()
            for call in (
                store.begin("d", "fp", 1),
                store.renew("a", "t", 1),
                store.release("a", "t"),
            ):
                with pytest.raises(StoreUnavailable):
                    await call
            await server.start()  # same port; without persistence, an empty server
            assert (await store.begin("a", "fp", LONG)).outcome is Outcome.NEW


@pytest.mark.anyio
async def test_cancelled_begin_gives_its_lease_back(tmp_path: Path, anyio_backend: object) -> None:
    async with private_redis(tmp_path) as server, RedisStore(server.url) as store:
        sent = reading(store)
        server.pause()
        task = asyncio.ensure_future(store.begin("k", "fp", LONG))
        await asyncio.wait_for(sent.wait(), 10)  # the batch is out; its reply waits
        task.cancel()
        server.resume()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The lease the server granted nobody was released as soon as its reply came.
        for _ in range(100):
            if (await store.begin("k", "fp", LONG)).outcome is Outcome.NEW:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the abandoned lease still blocks the key")
