"""One AMQP delivery of ``AmqpSubscription`` (``oncely.brokers._amqp_consume``) and how it is
settled: acks through the channel's ``AckWindow``, delayed nacks and rejects republished to
the retry bucket or the dead-letter queue before the original is acked.

It reaches the broker through ``BrokerLink``, a protocol ``AmqpBroker`` satisfies, so this
module never imports ``oncely.brokers.amqp`` (which imports it through the subscription).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from oncely.brokers._ack_after import AckWithheld
from oncely.brokers._amqp_acks import AckWindow
from oncely.brokers._amqp_message import own_headers, parse_props, properties
from oncely.brokers._amqp_topology import AmqpOptions, bucket_for, bucket_name, dlq_name
from oncely.brokers.base import Delivery, Headers, error_headers
from oncely.errors import AlreadySettled, BrokerError, DeliveryExpired, NotSupported, PublishFailed

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection
    from pamqp.commands import Basic
    from pamqp.common import FieldTable


class BrokerLink(Protocol):
    """What a subscription and its deliveries need from the broker (``AmqpBroker``)."""

    options: AmqpOptions

    async def _connected(self) -> AbstractRobustConnection:
        """The open robust connection (opened on first use)."""
        ...

    async def _ensure_topology(self, topic: str) -> None:
        """Declare ``topic``'s queues unless already done."""
        ...

    def _forget_topology(self, topic: str) -> None:
        """Declare ``topic``'s queues again before its next publish."""
        ...

    async def _send(self, queue: str, body: bytes, props: Basic.Properties) -> None:
        """Publish to ``queue`` and await the confirm (``PublishFailed`` otherwise)."""
        ...


class Owner(Protocol):
    """What a delivery needs from its subscription (``AmqpSubscription``)."""

    topic: str
    broker: BrokerLink

    async def release(self) -> None:
        """The delivery's prefetch slot is free."""
        ...


log = logging.getLogger("oncely.brokers.amqp")

_OPEN: Final = 0
_SETTLING: Final = 1  # an ack frame is committed to; never send another for this tag
_SETTLED: Final = 2
_EXPIRED: Final = 3


class AmqpDelivery(Delivery):
    """A delivery from an AMQP queue. See ``oncely.brokers.amqp`` for the guarantees."""

    __slots__ = ("_props", "_state", "_sub", "_tag", "_window")

    def __init__(
        self,
        sub: Owner,
        window: AckWindow,
        tag: int,
        body: bytes,
        props: Basic.Properties,
        redelivered: bool,
    ) -> None:
        p = parse_props(props, body, redelivered)
        super().__init__(
            id=p.id,
            topic=sub.topic,
            body=body,
            headers=p.headers,
            attempt=p.attempt,
            enqueued_at=p.enqueued_at,
        )
        self._sub = sub
        self._props = props
        self._window = window
        self._tag = tag
        self._state = _OPEN

    @property
    def settled(self) -> bool:
        return self._state == _SETTLED

    async def _begin(self) -> None:
        if self._state in (_SETTLED, _SETTLING):
            raise AlreadySettled(f"delivery {self.id!r} was already settled")
        if self._state == _EXPIRED:
            raise DeliveryExpired(f"delivery {self.id!r}: its AMQP channel closed")
        if self._window.closed:
            await self._expire()
            raise DeliveryExpired(f"delivery {self.id!r}: its AMQP channel closed")

    async def _expire(self) -> None:
        if self._state != _EXPIRED:
            self._state = _EXPIRED
            await self._sub.release()

    async def _finish(self, after: asyncio.Future[Any] | None = None) -> None:
        self._state = _SETTLING
        try:
            await self._window.ack(self._tag, after)
        except AckWithheld:
            self._state = _OPEN  # nothing was sent: still this consumer's to settle
            raise
        except BrokerError:
            await self._expire()
            raise
        finally:
            # Also on cancellation: the flush still sends this ack (a conditional one only if
            # its condition holds: oncely.brokers._ack_after).
            if self._state == _SETTLING:
                self._state = _SETTLED
                await self._sub.release()

    async def ack(self) -> None:
        await self._begin()
        await self._finish()

    async def ack_after(self, recorded: asyncio.Future[Any]) -> None:
        """Ack once ``recorded`` is done without an error; if it fails, nothing is sent and
        ``AckWithheld`` is raised (``oncely.brokers._ack_after``)."""
        await self._begin()
        await self._finish(recorded)

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> None:
        await self._begin()
        try:
            bucket = bucket_for(delay)
            target = self.topic if bucket is None else bucket_name(self.topic, bucket[1])
            headers = self._headers()
            # The next delivery's attempt is this header plus one; a deferral keeps this one's.
            headers[Headers.ATTEMPT] = str(self.attempt - 1 if defer else self.attempt)
            if error is not None:
                added = error_headers(self.headers, error)
                for name in (Headers.FIRST_ERROR, Headers.LAST_ERROR):
                    headers[name] = added[name]
            await self._republish(target, headers)
        except BaseException as exc:
            await self._requeue_instead(exc)
            raise
        await self._finish()

    async def reject(self, reason: str) -> None:
        await self._begin()
        try:
            headers = self._headers()
            headers[Headers.REASON] = reason
            headers[Headers.ATTEMPT] = str(self.attempt)
            headers[Headers.FAILED_AT] = repr(time.time())
            await self._republish(dlq_name(self.topic), headers)
        except BaseException as exc:
            await self._requeue_instead(exc)
            raise
        await self._finish()

    async def _requeue_instead(self, exc: BaseException) -> None:
        """Settle with ``basic.nack(requeue=True)`` a delivery whose nack or reject failed
        before it was acked (the republish failed or was cancelled, or the delay was too long).

        Why requeue, and not the alternatives:

        * Holding it unsettled keeps a prefetch slot until ``consumer_timeout`` fires, and
          that closes the channel and requeues every unacked delivery on it, other handlers'
          included, whose settles then fail.
        * ``requeue=False`` dead-letters through the work queue's own dead-letter exchange:
          for a nack that throws the retry away, and when the republish failed because the
          DLQ is unroutable, RabbitMQ drops an unroutable dead letter: a loss.
        * ``requeue=True`` never loses the message. It comes back at once, flagged
          redelivered, so its next attempt counts one more (the delay is not honoured). The
          risk is a tight loop while republishing keeps failing; a failed republish makes the
          broker declare the topology again before the next one, which heals the usual cause
          (a deleted delay-bucket or DLQ queue). A republish that landed before it failed to
          confirm leaves a duplicate, never a loss, as the nack path always has.

        The caller's error is still raised (with a note), so the runtime logs it.
        """
        if isinstance(exc, PublishFailed):
            self._sub.broker._forget_topology(self.topic)
        if self._state != _OPEN:
            return  # expired meanwhile: the broker requeues it with the channel
        if self._window.closed:
            await self._expire()
            return
        self._state = _SETTLING
        try:
            # Shielded: a cancelled nack must still hand the message back now.
            await asyncio.shield(self._window.requeue(self._tag))
        finally:
            self._state = _SETTLED
            await self._sub.release()
        if isinstance(exc, Exception):
            exc.add_note("oncely: the delivery was requeued instead (basic.nack requeue=True)")

    async def extend(self, seconds: float) -> None:
        raise NotSupported(
            "AMQP cannot extend a delivery; size consumer_timeout from the handler timeout"
        )

    def _headers(self) -> FieldTable:
        headers = own_headers(self._props.headers)
        headers[Headers.MESSAGE_ID] = self.id
        headers.setdefault(Headers.PUBLISHED_AT, repr(self.enqueued_at))
        return headers

    async def _republish(self, queue: str, headers: FieldTable) -> None:
        # Confirmed before the original is acked: a crash in between leaves a duplicate.
        props = properties(self.id, headers, self.enqueued_at, self._props)
        broker = self._sub.broker
        await broker._ensure_topology(self.topic)  # again, if a failed republish forgot it
        await broker._send(queue, self.body, props)
        if self._window.closed:
            await self._expire()
            raise DeliveryExpired(
                f"delivery {self.id!r}: channel closed after the republish; the broker "
                "redelivers the original too (a duplicate, not a loss)"
            )
