"""The SQS broker's client and its life: made once on first use (and dropped if its first
call fails), then closed after a flush of the batched acks and visibility changes, with a
grace for the long polls under way and an error logged for whatever could not be confirmed.

``Connection`` is a base class of ``SqsBroker``, not an object it calls: the methods are found
on the broker's type as before, so no call layer or attribute read is added anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiobotocore.session import AioSession

from oncely._tasks import spawn
from oncely.brokers._sqs_client import client_config
from oncely.brokers._sqs_errors import map_errors
from oncely.errors import ConnectionLost

if TYPE_CHECKING:
    import collections
    from collections.abc import Coroutine

    from types_aiobotocore_sqs import SQSClient

    from oncely.brokers._sqs_batch import Batcher
    from oncely.brokers._sqs_consume import SqsSubscription
    from oncely.brokers._sqs_options import SqsOptions

__all__ = ["Connection"]

log = logging.getLogger("oncely.brokers.sqs")

_CLOSE_GRACE = 2.0
_CLOSE_FLUSH = 10.0  # bounds the first flush of aclose: a silent server must not hang a close


class Connection:
    """The client, connect and close of an ``SqsBroker``; it sets these attributes."""

    options: SqsOptions
    api_calls: collections.Counter[str]
    _stack: contextlib.AsyncExitStack | None
    _client: SQSClient | None
    _connect_lock: asyncio.Lock | None
    _batchers: dict[tuple[str, str], Batcher[Any]]
    _subscriptions: list[SqsSubscription]
    _tasks: set[asyncio.Task[None]]
    _closed: bool

    # ------------------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Create the client and make one cheap call to prove SQS answers. Idempotent.

        Raises:
            ConnectionLost: SQS could not be reached.
            ConfigError: no credentials or region, or they were refused.
        """
        client = await self._connected()
        self.api_calls["admin"] += 1
        try:
            with map_errors("connect"):
                await client.list_queues(
                    QueueNamePrefix=self.options.prefix or "oncely", MaxResults=1
                )
        except BaseException:
            # A client whose first call failed is dropped (its HTTP session closed), so a
            # failed connect leaks nothing and the next connect starts afresh.
            if self._client is client:
                stack, self._stack, self._client = self._stack, None, None
                if stack is not None:
                    with contextlib.suppress(Exception):
                        await stack.aclose()
            raise

    async def _connected(self) -> SQSClient:
        if self._closed:
            raise ConnectionLost("the SQS broker was closed")
        if self._client is not None:
            return self._client
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._client is None:
                o = self.options
                stack = contextlib.AsyncExitStack()
                with map_errors("connect"):
                    session = AioSession(profile=o.profile)
                    config = client_config(o, session)
                    self._client = await stack.enter_async_context(
                        session.create_client(
                            "sqs", region_name=o.region, endpoint_url=o.endpoint, config=config
                        )
                    )
                self._stack = stack
        assert self._client is not None
        return self._client

    async def aclose(self) -> None:
        """Flush pending acks and visibility changes, then close. Idempotent. Unsettled
        deliveries come back once their visibility runs out.

        Long polls still in flight get ``_CLOSE_GRACE`` seconds to finish and hand back what
        they caught; after that they are cut off, and whatever the server had already handed
        them comes back once its visibility runs out (so a shutdown never waits out a 20 s
        poll). Batched acks and visibility changes the flush could not get confirmed in time
        fail their callers with ``ConnectionLost`` and are logged as an error (their messages
        come back once their visibility runs out)."""
        if self._closed:
            return
        for sub in self._subscriptions:
            sub.shutdown()
        await self._flush(_CLOSE_FLUSH)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=_CLOSE_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._flush(5.0)
        self._closed = True
        self._abandon()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _flush(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                for batcher in list(self._batchers.values()):
                    await batcher.flush()

    def _abandon(self) -> None:
        """What the flush could not send in time fails its callers, and is logged: nobody may
        be awaiting it any more (a cancelled handler), and an unsent ack or hand-back must
        not vanish silently. Those messages come back when their visibility runs out."""
        for (kind, url), batcher in self._batchers.items():
            left = batcher.abandon(ConnectionLost("the SQS broker closed before this was sent"))
            if left:
                log.error(
                    "SQS broker closed with %d %s entr%s for %s not confirmed (the server did "
                    "not answer in time); unsent acks come back when their visibility runs out",
                    left,
                    kind,
                    "y" if left == 1 else "ies",
                    url,
                )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._tasks, coro, log, "SQS background task failed")
