"""What a handler that asks for it receives as its second argument."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from oncely._tracing_headers import send
from oncely.brokers.base import Headers, TransactionalDelivery
from oncely.errors import ConfigError
from oncely.runtime.codec import encode

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime.publisher import Publisher
    from oncely.stores.base import StoreTransaction

__all__ = ["Context"]

_TRANSACTIONAL: dict[type, bool] = {}
"""Whether a delivery class is a ``TransactionalDelivery``: ``isinstance`` on an ABC runs
Python code (``ABCMeta.__instancecheck__``), and ``produce`` asks once per output."""

_KEY = Headers.KEY
_PUBLISHED_AT = Headers.PUBLISHED_AT

_stamp = (0.0, "")
"""The last ``oncely-published-at`` of a transactional output: the time, and its text."""


def _published_at() -> str:
    """``repr(time.time())``, reused for a millisecond: formatting a float (its shortest
    repr) is the largest single cost of an exactly-once output, which this runs for. The
    text is a real clock reading at most 1 ms before the call (Kafka's own record timestamps
    are milliseconds), and a clock that went back is read afresh."""
    global _stamp
    now = time.time()
    at, text = _stamp
    if not 0.0 <= now - at < 0.001:
        text = repr(now)
        _stamp = (now, text)
    return text


class Context:
    """Per-delivery context: metadata, the store transaction, and publishing.

    Attributes:
        delivery: the broker delivery (id, attempt, headers, topic, enqueued_at).
        key: the idempotency key in use, or ``None`` when the handler runs without dedupe.
        transaction: the open store transaction in transactional mode, else ``None``.
    """

    __slots__ = ("_publisher", "delivery", "key", "transaction")

    def __init__(
        self,
        delivery: Delivery,
        key: str | None,
        publisher: Publisher,
        transaction: StoreTransaction | None = None,
    ) -> None:
        self.delivery = delivery
        self.key = key
        self.transaction = transaction
        self._publisher = publisher

    @property
    def attempt(self) -> int:
        return self.delivery.attempt

    @property
    def headers(self) -> Mapping[str, str]:
        return self.delivery.headers

    @property
    def connection(self) -> Any:
        """The connection of the open store transaction (transactional handlers only), for as
        long as the handler runs: once its transaction has ended, any use of it raises."""
        if self.transaction is None:
            raise ConfigError("ctx.connection needs a handler declared with transactional=True")
        return self.transaction.connection

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> str:
        """Publish through the worker's broker (see ``Publisher.publish``)."""
        return await self._publisher.publish(topic, payload, key=key, headers=headers, delay=delay)

    async def produce(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Publish as part of this delivery's broker transaction where it has one.

        On a Kafka subscription in exactly-once mode the record commits atomically with the
        consumed offset (visible to ``read_committed`` consumers only once the handler's
        message is acked). Everywhere else this is ``publish``: confirmed at once, and kept
        even if the handler then fails.

        Raises:
            ValueError: ``key`` is an empty string (as ``publish``).
        """
        if key == "":
            # As Publisher.publish: every output produced with it would share one key, and
            # an effectively-once consumer would run only the first of them.
            raise ValueError(
                "key must be a non-empty string (an empty key would be shared by every message "
                "published with it); pass key=None for none"
            )
        delivery = self.delivery
        kind = type(delivery)
        transactional = _TRANSACTIONAL.get(kind)
        if transactional is None:
            transactional = _TRANSACTIONAL[kind] = isinstance(delivery, TransactionalDelivery)
        if not transactional:
            return await self.publish(topic, payload, key=key, headers=headers)
        produce: Callable[..., Awaitable[str]]
        produce = delivery.produce  # type: ignore[attr-defined]  # a TransactionalDelivery
        if headers:
            merged = dict(headers)
            if key is not None:
                merged[_KEY] = key
            if _PUBLISHED_AT not in merged:
                merged[_PUBLISHED_AT] = _published_at()
        elif key is not None:  # the common case in one step: this runs for every output
            merged = {_KEY: key, _PUBLISHED_AT: _published_at()}
        else:
            merged = {_PUBLISHED_AT: _published_at()}
        body = payload if type(payload) is bytes else encode(payload)
        if self._publisher._tracer is not None:
            return await send(
                self._publisher._tracer,
                self._publisher._system,
                topic,
                merged,
                lambda: produce(topic, body, headers=merged),
            )
        return await produce(topic, body, headers=merged)
