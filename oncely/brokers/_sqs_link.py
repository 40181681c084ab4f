"""What the private SQS modules need of the broker.

``SqsBroker`` satisfies ``BrokerLink``, so ``_sqs_consume``, ``_sqs_delivery``, ``_sqs_admin``
and ``_sqs_queues`` never import ``oncely.brokers.sqs`` back: every import points from the
public module down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import collections
    from collections.abc import Awaitable, Coroutine

    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

    from oncely.brokers._sqs_options import SqsOptions
    from oncely.brokers._sqs_wire import Outgoing
    from oncely.brokers.base import Delivery

__all__ = ["BrokerLink"]


class BrokerLink(Protocol):
    """What subscriptions, deliveries, queue resolution and the DLQ admin need from
    ``SqsBroker``."""

    options: SqsOptions
    api_calls: collections.Counter[str]
    api_entries: collections.Counter[str]
    visibility_capped: int
    _client: SQSClient | None
    """The client once made (``None`` before, and once closed): ``_connected`` makes it."""

    async def _connected(self) -> SQSClient:
        """The client (created on first use); ``ConnectionLost`` once the broker is closed."""
        ...

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, supervised (awaited or cut off by ``aclose``)."""
        ...

    async def queue_urls(self, topic: str) -> tuple[str, str]:
        """The (queue URL, DLQ URL) of ``topic``, created on first use unless ``create=0``."""
        ...

    def _forget(self, topic: str) -> None:
        """The queue vanished: resolve it again on next use."""
        ...

    async def _send(
        self, url: str, out: Outgoing, *, delay: float = 0.0, group: str | None, dedupe: str
    ) -> None:
        """Send one encoded message (batched); returns once SQS accepted it."""
        ...

    async def _receive(
        self, topic: str, n: int, visibility: int
    ) -> tuple[str, list[MessageTypeDef]]:
        """One long-poll receive of up to ``n`` messages; returns the queue URL with them."""
        ...

    def _delete(self, url: str, receipt: str) -> Awaitable[object]:
        """Delete a received message (batched): await the result to learn the outcome."""
        ...

    def _change_visibility(self, url: str, receipt: str, seconds: int) -> Awaitable[object]:
        """Set a received message's visibility timeout (batched): await the result to learn
        the outcome."""
        ...

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send ``delivery`` to its DLQ with ``reason``, then delete the original."""
        ...
