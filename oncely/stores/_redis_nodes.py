"""Redis Cluster batch connections, one per node (``oncely.stores.redis``).

The standalone store's batch connection (``_redis_dedicated``) for each node: a connection of
the node's own kind (its options, TLS, credentials), opened by redis-py and then handed to a
``Link``, so a batch is written to each node from the batcher's callback and answered from the
links' ``data_received``, with no task. Only the plain case is taken this way: every node the
batch's slots map to has its link open and idle. Anything else (a node without a link yet, a
lost connection, a deadline, a redirect, ``NOSCRIPT``) hands the whole batch back to the task
path (``_redis_wire.send_by_node`` and redis-py's cluster pipeline), which re-sends it:
safe, as every transition is idempotent for its token. A link is opened on a task of its own,
the first time a batch needs its node, and again after it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis import exceptions as rx
from redis._parsers.hiredis import _AsyncHiredisParser

from oncely.stores._redis_batch import Finish
from oncely.stores._redis_dedicated import _Watch
from oncely.stores._redis_link import Link, take_over
from oncely.stores._redis_wire import Call, by_slot, fill_group, pack_batch

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

__all__ = ["NodeLinks", "start_cluster"]

log = logging.getLogger("oncely.stores.redis")


class _Node:
    __slots__ = ("conn", "link", "watch")

    def __init__(self, conn: Any, link: Link) -> None:
        self.conn = conn
        self.link = link
        self.watch = _Watch()


class NodeLinks:
    """One link per node, by the node's name (``host:port``)."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._nodes: dict[str, _Node] = {}
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self._plain = False  # the parser is not hiredis: every batch takes the task path

    def start(
        self, slots: list[int], packed: list[bytes], answer: Callable[[list[Any] | None], None]
    ) -> bool:
        """Write ``packed[i]`` to the node serving ``slots[i]``, each node's in one buffer, if
        every such node's link is open and idle. ``answer`` then gets, from a loop callback,
        one reply per command (an error reply as its exception), or ``None`` if a connection
        was lost or a deadline passed (the batch's fate on it is unknown). Returns whether it
        sent."""
        if self._plain:
            return False
        manager = self._client.nodes_manager
        groups: dict[str, list[int]] = {}
        targets: dict[str, ClusterNode] = {}
        try:
            for i, slot in enumerate(slots):
                node = manager.get_node_from_slot(slot)
                name = node.name
                if name not in groups:
                    groups[name] = []
                    targets[name] = node
                groups[name].append(i)
        except (rx.RedisError, rx.RedisClusterException):
            return False  # no map of the slots: the pipeline makes one
        ready = True
        for name, node in targets.items():
            held = self._nodes.get(name)
            if held is None or held.link.lost:
                self._open(node)
                ready = False
            elif not held.link.idle:
                ready = False
        if not ready:
            return False
        replies: list[Any] = [None] * len(packed)
        state = [len(packed), False]  # replies still due, whether a connection failed

        def waiter(i: int, held: _Node) -> Callable[[Any, bool], None]:
            def replied(reply: Any, failed: bool) -> None:
                if failed:
                    state[1] = True
                else:
                    replies[i] = reply
                if held.link.idle:
                    held.watch.stop()
                state[0] -= 1
                if state[0] == 0:
                    answer(None if state[1] else replies)

            return replied

        for name, todo in groups.items():
            held = self._nodes[name]
            writer = held.conn._writer
            held.watch.start(writer, held.conn.socket_timeout)
            held.link.send_many([packed[i] for i in todo], [waiter(i, held) for i in todo])
        return True

    async def connect(self) -> None:
        """Open the primaries' links now, so the first batches need not wait for them (a
        node that cannot be reached now gets one when a batch next needs it)."""
        await asyncio.gather(*(self._connect(node) for node in self._client.get_primaries()))

    def _open(self, node: ClusterNode) -> None:
        name = node.name
        if self._closed or name in self._opening:
            return
        task = asyncio.get_running_loop().create_task(self._connect(node))
        self._opening[name] = task
        task.add_done_callback(lambda _: self._opening.pop(name, None))

    async def _connect(self, node: ClusterNode) -> None:
        old = self._nodes.pop(node.name, None)
        if old is not None:
            await _close(old)
        conn: Any = node.connection_class(**node.connection_kwargs)
        try:
            await conn.connect()
        except (rx.RedisError, OSError) as exc:
            # The batch went the task path meanwhile, which reports the node's failure.
            log.debug("redis store: no batch link to %s: %s", node.name, exc)
            await conn.disconnect(nowait=True)
            return
        except BaseException:  # cancelled by aclose: no half-open connection left behind
            await asyncio.shield(conn.disconnect(nowait=True))
            raise
        link = None
        if type(conn._parser) is not _AsyncHiredisParser:
            self._plain = True  # the task path, as before, reads with redis-py's parser
        elif conn._writer is not None:
            link = take_over(conn._writer, conn._parser._reader)
        if link is None or self._closed:
            await conn.disconnect(nowait=True)
            return
        self._nodes[node.name] = _Node(conn, link)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        nodes, self._nodes = list(self._nodes.values()), {}
        for held in nodes:
            await _close(held)


async def _close(held: _Node) -> None:
    held.watch.cancel()
    with contextlib.suppress(rx.RedisError, OSError):
        await held.conn.disconnect(nowait=True)


# Replies of a batch sent on the links that the task path must redo: nothing ran (a redirect,
# a node that cannot serve now, NOSCRIPT), and it knows what to do.
_AGAIN = (rx.MovedError, rx.AskError, rx.TryAgainError, rx.ClusterDownError, rx.NoScriptError)


def start_cluster(
    nodes: NodeLinks, calls: list[Call], encoding: tuple[str, str], finish: Finish[Any]
) -> bool:
    """The store's ``start`` on a Cluster: one command per slot, each node's on its link. A
    redirect, ``NOSCRIPT`` or a lost link sends the batch again on the task path."""
    try:
        slots = by_slot(calls, encoding)
        groups = list(slots.values())
        packed = [pack_batch([calls[i] for i in group], encoding) for group in groups]
    except UnicodeError:
        return False

    def answer(replies: list[Any] | None) -> None:
        if replies is None or any(isinstance(r, _AGAIN) for r in replies):
            finish(None)
            return
        results: list[Any] = [None] * len(calls)
        for group, reply in zip(groups, replies, strict=True):
            fill_group(results, calls, group, reply)  # as the task path does
        finish(results)

    return nodes.start(list(slots), packed, answer)
