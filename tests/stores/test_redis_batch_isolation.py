"""Redis store: what fails in a batch fails only its own calls. A Cluster node that fails
fails only the calls it carried (the calls other nodes answered are committed: a ``begin``
there took its key, so its caller must get the token); a key the encoding cannot carry fails
only its own call."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from oncely.errors import StoreError, StoreUnavailable
from oncely.stores._redis_scripts import SCRIPTS
from oncely.stores._redis_url import parse_redis_url
from oncely.stores._redis_wire import Call, batch_command
from oncely.stores.base import Begin, Outcome
from oncely.stores.redis import RedisStore
from tests.stores._redis_support import CLUSTER_URL, REDIS_URL, free_port, with_options

LONG = 30.0


@pytest.mark.anyio
async def test_a_failed_node_fails_only_its_own_calls(unique: str, anyio_backend: object) -> None:
    nodes = [ClusterNode(h, p) for h, p in parse_redis_url(CLUSTER_URL).nodes]
    # No retries: the pipeline gives up on the unreachable node at once.
    client = RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0))
    other = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in nodes])
    try:
        async with RedisStore(client, prefix=f"{unique}:") as store:
            good, bad = store.redis_key("good"), store.redis_key("bad")
            manager = client.nodes_manager
            assert manager.slots_cache[key_slot(bad.encode())][0].name != (
                manager.slots_cache[key_slot(good.encode())][0].name
            ), "the two keys must live on different nodes"
            # The client believes "bad"'s slot is served by a node that refuses connections
            # (a primary that just died), on the fast path and in the pipeline alike.
            dead = ClusterNode(
                "127.0.0.1", free_port(), server_type="primary", **manager.connection_kwargs
            )
            manager.slots_cache[key_slot(bad.encode())] = [dead]
            got_good, got_bad = await asyncio.gather(
                store.begin("good", "fp", LONG),
                store.begin("bad", "fp", LONG),
                return_exceptions=True,
            )
            assert isinstance(got_bad, StoreUnavailable), got_bad
            assert not isinstance(got_good, BaseException), got_good
            assert got_good.outcome is Outcome.NEW and got_good.token is not None
            # The caller holds the lease it was granted and can finish it.
            await store.complete("good", got_good.token, b"r", LONG)
        async with RedisStore(other, prefix=f"{unique}:") as check:
            assert (await check.begin("good", "fp", LONG)).result == b"r"
    finally:
        await other.aclose()
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("url", [REDIS_URL, CLUSTER_URL], ids=["standalone", "cluster"])
async def test_a_key_the_encoding_cannot_carry_fails_alone(
    url: str, unique: str, anyio_backend: object
) -> None:
    # A lone surrogate (e.g. from a JSON "\\ud800" escape) has no UTF-8 form.
    async with RedisStore(with_options(url, prefix=f"{unique}:")) as store:
        good, bad = await asyncio.gather(
            store.begin("good", "fp", LONG),
            store.begin("bad\ud800", "fp", LONG),
            return_exceptions=True,
        )
        assert isinstance(bad, StoreError) and "cannot be encoded" in str(bad), repr(bad)
        assert not isinstance(good, BaseException), repr(good)
        assert good.outcome is Outcome.NEW and good.token is not None
        await store.complete("good", good.token, None, LONG)


@pytest.mark.anyio
@pytest.mark.parametrize("url", [REDIS_URL, CLUSTER_URL], ids=["standalone", "cluster"])
async def test_a_batch_sent_twice_answers_the_same_the_second_time(
    url: str, unique: str, anyio_backend: object
) -> None:
    """The Cluster fallback and the connection's retry re-send a batch whose reply was lost,
    after it may have run: each transition of the batch script must answer as the first run
    did, and change nothing more (a begin keeps its token; nobody else's lease is touched)."""
    async with RedisStore(with_options(url, prefix=f"{unique}:")) as store:
        done = await store.begin("done", "fp", LONG)
        held = await store.begin("held", "fp", LONG)
        gone = await store.begin("gone", "fp", LONG)
        assert done.token and held.token and gone.token
        ms = 30_000
        calls = [
            Call(SCRIPTS["begin"], store.redis_key("new"), ("fp", "t-new", ms, 2 * ms)),
            Call(SCRIPTS["complete"], store.redis_key("done"), (done.token, ms, "1", b"r")),
            Call(SCRIPTS["renew"], store.redis_key("held"), (held.token, ms, 2 * ms)),
            Call(SCRIPTS["release"], store.redis_key("gone"), (gone.token,)),
        ]
        client = store._checked()
        # One slot per command on a Cluster; the keys here differ, so one command per call.
        first = [await client.execute_command(*batch_command([c])) for c in calls]
        second = [await client.execute_command(*batch_command([c])) for c in calls]
        assert first == [[[0]], [[1]], [[1]], [[1]]]
        assert second == [[[0]], [[1]], [[1]], [[0]]]  # the release found nothing to release
        # Everything stands as after the first run.
        other = await store.begin("new", "fp", LONG)
        assert other.outcome is Outcome.IN_PROGRESS
        assert await store.begin("done", "fp", LONG) == Begin(Outcome.COMPLETED, result=b"r")
        assert (await store.begin("held", "fp", LONG)).outcome is Outcome.IN_PROGRESS
        assert (await store.begin("gone", "fp", LONG)).outcome is Outcome.NEW
        await store.complete("new", "t-new", None, LONG)  # the token the first run granted
