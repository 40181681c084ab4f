"""What the Redis store does off its fast path, on the batcher's task: a Cluster batch
there (a redirect, ``NOSCRIPT`` or a lost node link sent it back from ``start_cluster``, or
the parser is not hiredis), a batch holding a key or argument the client's encoding cannot
carry, the release of a key a cancelled ``begin`` took, and loading the scripts.

``Fallbacks`` is a base class of ``RedisStore``, not an object it calls: the methods are found
on the store's type as before, so no call layer or attribute read is added anywhere.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from redis import exceptions as rx

from oncely.errors import StoreError
from oncely.stores._redis_errors import map_errors
from oncely.stores._redis_scripts import SCRIPTS
from oncely.stores._redis_wire import (
    batch_command,
    by_slot,
    fill_group,
    pack_batch,
    send_by_node,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from oncely.stores._redis_wire import Call as _Call

__all__ = ["Fallbacks"]

_BEGIN, _RELEASE = SCRIPTS["begin"], SCRIPTS["release"]


class Fallbacks:
    """The slow paths of a ``RedisStore``; it sets these attributes."""

    _client: Redis | RedisCluster | None
    _write_encoded: Callable[
        [Redis | RedisCluster, list[_Call], tuple[str, str]], Awaitable[list[Any]]
    ]

    async def _write_apart(
        self, client: Redis | RedisCluster, calls: list[_Call], encoding: tuple[str, str]
    ) -> list[Any]:
        bad: dict[int, StoreError] = {}
        for i, call in enumerate(calls):
            try:
                pack_batch([call], encoding)
            except UnicodeError as exc:
                bad[i] = StoreError(
                    f"redis {call.script.name}: key {call.key!r} or its arguments cannot be "
                    f"encoded as {encoding[0]}: {exc}"
                )
        good = [call for i, call in enumerate(calls) if i not in bad]
        got = iter(await self._write_encoded(client, good, encoding) if good else [])
        return [bad[i] if i in bad else next(got) for i in range(len(calls))]

    async def _write_cluster(
        self, client: RedisCluster, calls: list[_Call], encoding: tuple[str, str]
    ) -> list[Any]:
        """One command per slot, each node's in one buffer (see ``_redis_wire``)."""
        slots = by_slot(calls, encoding)
        slot_of, groups = list(slots), list(slots.values())
        packed = [pack_batch([calls[i] for i in group], encoding) for group in groups]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(groups)))
        for round_ in range(2):

            def command(i: int, todo: list[int] = todo) -> tuple[Any, ...]:
                return batch_command([calls[c] for c in groups[todo[i]]])

            with map_errors("batch"):
                replies = await send_by_node(
                    client, [slot_of[g] for g in todo], [packed[g] for g in todo], command
                )
            again = []
            for g, reply in zip(todo, replies, strict=True):
                group = groups[g]
                if isinstance(reply, rx.NoScriptError) and round_ == 0:
                    again.append(g)
                    continue
                fill_group(results, calls, group, reply)
            if not again:
                break
            try:
                with map_errors("script load"):
                    await self._load_scripts(client)
            except StoreError as exc:
                # The first round's replies are committed: this fails only its own calls.
                for g in again:
                    for i in groups[g]:
                        results[i] = exc
                break
            todo = again
        return results

    async def _give_back(self, call: _Call, reply: Any) -> None:
        """Release a key a cancelled ``begin`` took: its caller will never use or release the
        lease, which would otherwise block the key until it runs out. Sent on its own, not
        through the batch, which is what is waiting for this."""
        client = self._client
        if call.script is not _BEGIN or client is None or int(reply[0]) != 0:
            return
        with contextlib.suppress(StoreError):
            with map_errors("release"):
                await client.evalsha(_RELEASE.sha, 1, call.key, call.args[1])

    @staticmethod
    async def _load_scripts(client: Redis | RedisCluster) -> None:
        # On a Cluster, SCRIPT LOAD goes to every primary.
        for script in SCRIPTS.values():
            await client.script_load(script.source)
