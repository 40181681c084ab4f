"""Third-party-like backends: real memory brokers and stores wrapped to fail the way an
adapter written by someone else might (any exception, not only oncely's own).

Nothing here mocks a server: every call that does not fail reaches the real backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from oncely.brokers.base import Broker, Capabilities, DeadLetterAdmin, Delivery, Subscription
from oncely.errors import NotSupported
from oncely.stores.memory import MemoryStore

if TYPE_CHECKING:
    from oncely.brokers.base import DeadLetter
    from oncely.stores.base import Begin

Hook = Callable[[Delivery], None]


class WrappedBroker(Broker, DeadLetterAdmin):
    """Delegates to ``inner``; the hooks may raise to simulate a broken adapter.

    Args:
        inner: the real broker.
        max_delay: a ``Capabilities.max_delay`` to declare and enforce (``NotSupported`` above
            it, as RabbitMQ's adapter does).
        on_consume: called on each ``consume(...)`` call (may raise).
        on_next: called before each delivery is fetched (may raise).
        on_extend, on_ack: called with the delivery before the real operation (may raise).
    """

    def __init__(
        self,
        inner: Broker,
        *,
        max_delay: float | None = None,
        on_consume: Callable[[], None] | None = None,
        on_next: Callable[[], None] | None = None,
        on_extend: Hook | None = None,
        on_ack: Hook | None = None,
    ) -> None:
        self.inner = inner
        self.capabilities: Capabilities = replace(inner.capabilities, max_delay=max_delay)
        self.url = inner.url
        self.on_consume = on_consume
        self.on_next = on_next
        self.on_extend = on_extend
        self.on_ack = on_ack
        self.nacks: list[tuple[str, float, bool]] = []
        self.extends: dict[str, int] = {}

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        return await self.inner.publish(
            topic, body, headers=headers, message_id=message_id, delay=delay
        )

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> Subscription:
        if self.on_consume is not None:
            self.on_consume()
        return _Sub(self, self.inner.consume(topic, prefetch=prefetch, visibility=visibility))

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        assert isinstance(self.inner, DeadLetterAdmin)
        return await self.inner.dead_letters(topic, limit=limit)

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        assert isinstance(self.inner, DeadLetterAdmin)
        return await self.inner.replay(topic, ids=ids)


class _Sub(Subscription):
    def __init__(self, broker: WrappedBroker, inner: Subscription) -> None:
        self.broker = broker
        self.inner = inner

    async def __anext__(self) -> Delivery:
        if self.broker.on_next is not None:
            self.broker.on_next()
        return _Delivery(self.broker, await self.inner.__anext__())

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Delivery(Delivery):
    def __init__(self, broker: WrappedBroker, inner: Delivery) -> None:
        super().__init__(
            id=inner.id,
            topic=inner.topic,
            body=inner.body,
            headers=inner.headers,
            attempt=inner.attempt,
            enqueued_at=inner.enqueued_at,
            key=inner.key,
        )
        self.broker = broker
        self.inner = inner

    @property
    def settled(self) -> bool:
        return self.inner.settled

    async def ack(self) -> None:
        if self.broker.on_ack is not None:
            self.broker.on_ack(self)
        await self.inner.ack()

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> None:
        limit = self.broker.capabilities.max_delay
        if limit is not None and delay > limit:
            raise NotSupported(f"delay {delay}s is over max_delay {limit}s")
        self.broker.nacks.append((self.id, delay, defer))
        await self.inner.nack(delay, defer=defer, error=error)

    async def reject(self, reason: str) -> None:
        await self.inner.reject(reason)

    async def extend(self, seconds: float) -> None:
        self.broker.extends[self.id] = self.broker.extends.get(self.id, 0) + 1
        if self.broker.on_extend is not None:
            self.broker.on_extend(self)
        await self.inner.extend(seconds)


class FaultyStore(MemoryStore):
    """A real memory store whose calls can be made to raise, per method and key."""

    def __init__(self) -> None:
        super().__init__()
        self.begin_error: BaseException | None = None
        self.renew_error: Callable[[str], BaseException | None] = lambda key: None
        self.complete_errors: list[BaseException] = []
        self.renewals: dict[str, int] = {}
        self.completions = 0

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        if self.begin_error is not None:
            raise self.begin_error
        return await super().begin(key, fingerprint, lease)

    async def renew(self, key: str, token: str, lease: float) -> None:
        self.renewals[key] = self.renewals.get(key, 0) + 1
        error = self.renew_error(key)
        if error is not None:
            raise error
        await super().renew(key, token, lease)

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        if self.complete_errors:
            raise self.complete_errors.pop(0)
        await super().complete(key, token, result, ttl)
        self.completions += 1


def anything(*_: Any) -> None:
    """A hook that does nothing."""
