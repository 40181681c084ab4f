"""Publishing typed payloads with idempotency keys."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from oncely._tracing_headers import messaging_system, send, tracer
from oncely.brokers.base import Broker, Headers
from oncely.brokers.registry import broker_from_url
from oncely.runtime.codec import encode

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from opentelemetry.trace import Tracer

__all__ = ["Publisher"]


class Publisher:
    """Publishes payloads to a broker.

    Args:
        broker: a broker URL or a ``Broker``. A URL's broker is owned (connected lazily,
            closed by ``aclose``); an instance is connected if needed but never closed here.
    """

    def __init__(self, broker: str | Broker) -> None:
        self.broker = broker_from_url(broker)
        self._owned = isinstance(broker, str)
        self._connected = False
        # Resolved again on connect: an application may set its tracer provider after
        # building the publisher but before the first publish.
        self._tracer: Tracer | None = tracer()
        self._system = messaging_system(self.broker.url)

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        message_id: str | None = None,
    ) -> str:
        """Encode ``payload`` and publish it; return the message id once the broker confirmed.

        Args:
            topic: where to publish.
            payload: ``bytes`` travel as-is; anything msgspec encodes becomes JSON.
            key: the idempotency key (``oncely-key`` header). Publish the same logical
                message twice with the same key and an effectively-once handler runs once.
            headers: extra ``str`` headers.
            delay: hold the message back this many seconds.
            message_id: a stable id of your own; otherwise the broker assigns one.

        Raises:
            TypeError: the payload cannot be encoded.
            ValueError: ``key`` is an empty string (every such message would share it).
            PublishFailed, ConnectionLost, NotSupported: from the broker.
        """
        if key is not None and not key:
            raise ValueError(
                "key must be a non-empty string (an empty key would be shared by every message "
                "published with it); pass key=None for none"
            )
        if not self._connected:
            await self.broker.connect()
            self._connected = True
            self._tracer = tracer()
        # The broker validates headers (str to str) on publish; this is only a copy to extend.
        merged = dict(headers or {})
        if key is not None:
            merged[Headers.KEY] = key
        merged.setdefault(Headers.PUBLISHED_AT, repr(time.time()))
        body = encode(payload)
        if self._tracer is not None:
            return await send(
                self._tracer,
                self._system,
                topic,
                merged,
                lambda: self.broker.publish(
                    topic, body, headers=merged, message_id=message_id, delay=delay
                ),
            )
        return await self.broker.publish(
            topic, body, headers=merged, message_id=message_id, delay=delay
        )

    async def aclose(self) -> None:
        """Close the broker if this publisher built it from a URL. Idempotent."""
        if self._owned and self._connected:
            self._connected = False
            await self.broker.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
