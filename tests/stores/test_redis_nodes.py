"""Redis Cluster batches on the store's own link per node (``oncely.stores._redis_nodes``):
sent from the batcher's callback and answered from the links, with no task; a node link the
server closed is opened again, its batch meanwhile going the task path."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from oncely.stores._redis_url import parse_redis_url
from oncely.stores.base import Outcome
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.stores._redis_support import CLUSTER_URL, spawned_batches, with_options

LONG = 30.0


def _linked(store: RedisStore) -> None:
    assert store._nodes is not None
    if store._nodes._plain:
        # redis-py 5 reads a Cluster node with its own ClusterParser, not hiredis: every
        # batch takes the task path, as before the links.
        pytest.skip("the cluster nodes' parser is not hiredis")


@pytest.mark.anyio
async def test_cluster_batches_are_sent_and_answered_without_a_task(
    unique: str, anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = spawned_batches(monkeypatch)
    async with RedisStore(with_options(CLUSTER_URL, prefix=f"{unique}:")) as store:
        _linked(store)
        keys = [f"k{i}" for i in range(40)]  # on every node
        begun = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
        assert {b.outcome for b in begun} == {Outcome.NEW}
        await asyncio.gather(
            *(
                store.complete(k, b.token or "", b"r", LONG)
                for k, b in zip(keys, begun, strict=True)
            )
        )
        again = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
        assert {(b.outcome, b.result) for b in again} == {(Outcome.COMPLETED, b"r")}
        assert spawned == []


@pytest.mark.anyio
async def test_a_node_link_the_server_closed_is_opened_again(
    unique: str, anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = spawned_batches(monkeypatch)
    nodes = [ClusterNode(h, p) for h, p in parse_redis_url(CLUSTER_URL).nodes]
    admin = RedisCluster(startup_nodes=nodes)
    await admin.initialize()  # its map of the nodes, to send each kill to its own
    try:
        async with RedisStore(with_options(CLUSTER_URL, prefix=f"{unique}:")) as store:
            _linked(store)
            assert store._nodes is not None
            links = store._nodes._nodes
            for name, held in list(links.items()):  # as an idle timeout or a proxy would
                host, port = held.conn._writer.get_extra_info("sockname")[:2]
                node = admin.get_node(node_name=name)
                assert node is not None, name
                assert await admin.client_kill(f"{host}:{port}", target_nodes=node)
            await eventually(lambda: all(held.link.lost for held in links.values()))
            keys = [f"a{i}" for i in range(40)]
            begun = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
            assert {b.outcome for b in begun} == {Outcome.NEW}
            assert spawned  # that batch went the task path, the links being reopened
            await eventually(
                lambda: len(links) == 3 and not any(h.link.lost for h in links.values())
            )
            spawned.clear()
            again = await asyncio.gather(*(store.begin(k, "fp", LONG) for k in keys))
            assert {b.outcome for b in again} == {Outcome.IN_PROGRESS}
            assert spawned == []  # and the next on the links again
    finally:
        await admin.aclose()
