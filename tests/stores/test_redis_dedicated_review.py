"""Review of the Redis store's batch connection (``oncely.stores._redis_dedicated.Dedicated``): an
exchange cut off anywhere must leave no reply pending on the connection for the next batch to
read as its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from oncely.stores.base import Outcome
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.stores._redis_support import (
    batch_connection,
    cut_batch,
    private_redis,
    with_options,
)

LONG = 30.0
BIG = 32 * 1024 * 1024
"""A result larger than the loopback socket buffers hold: its write waits in ``drain``."""


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["callback", "task"])
async def test_a_batch_cancelled_mid_write_leaves_no_reply_for_the_next(
    path: str, tmp_path: Path, anyio_backend: object
) -> None:
    async with private_redis(tmp_path) as server:
        # No deadline in the way: the batch is cut off by a cancel alone.
        async with RedisStore(with_options(server.url, socket_timeout=600)) as store:
            done = await store.begin("done", "fp", LONG)
            assert done.token is not None
            await store.complete("done", done.token, b"result", LONG)
            big = await store.begin("big", "fp", LONG)
            assert big.token is not None
            conn = batch_connection(store)
            if path == "task":
                store._batch._start = None  # every batch on a task, as a retried one is
            server.pause()
            cut = asyncio.ensure_future(store.complete("big", big.token, b"x" * BIG, LONG))
            # The server reads nothing: the write fills the socket's buffers, the rest of the
            # batch waits in the transport (on a task, the write waits for room).
            await eventually(
                lambda: (
                    conn._writer is not None and conn._writer.transport.get_write_buffer_size() > 0
                )
            )
            cut_batch(store, path, cut)
            with pytest.raises(asyncio.CancelledError):
                await cut
            server.resume()  # whatever of the cut batch got out is answered now
            # The next batch must read its own reply, not the cut one's.
            again = await asyncio.wait_for(store.begin("done", "fp", LONG), LONG)
            assert (again.outcome, again.result) == (Outcome.COMPLETED, b"result")
