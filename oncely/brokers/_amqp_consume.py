"""The consuming half of ``AmqpBroker``: subscription, delivery and batched acks.

It reaches the broker through ``BrokerLink``, a protocol ``AmqpBroker`` satisfies, so this
module never imports ``oncely.brokers.amqp`` (which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final, Protocol

import aiormq.exceptions

from oncely.brokers._amqp_acks import AckWindow
from oncely.brokers._amqp_topology import (
    AmqpOptions,
    bucket_for,
    bucket_name,
    dlq_name,
    map_errors,
    own_headers,
    parse_props,
    properties,
    props_of,
    topology,
)
from oncely.brokers.base import Delivery, Headers, Subscription, error_headers
from oncely.errors import (
    AlreadySettled,
    BrokerError,
    DeliveryExpired,
    NotSupported,
    PublishFailed,
)

if TYPE_CHECKING:
    import aiormq.abc
    from aio_pika.abc import (
        AbstractIncomingMessage,
        AbstractQueue,
        AbstractRobustChannel,
        AbstractRobustConnection,
    )
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
        sub: AmqpSubscription,
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

    async def _finish(self) -> None:
        self._state = _SETTLING
        try:
            await self._window.ack(self._tag)
        except BrokerError:
            await self._expire()
            raise
        finally:
            # Also on cancellation: the shielded flush still sends this ack.
            if self._state == _SETTLING:
                self._state = _SETTLED
                await self._sub.release()

    async def ack(self) -> None:
        await self._begin()
        await self._finish()

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


_Received = tuple["AckWindow", int, bytes, "Basic.Properties", bool]

MIN_CONSUMER_TIMEOUT = 1800.0
"""RabbitMQ's own default ``consumer_timeout``; the per-consumer value never goes below it."""


def consumer_timeout_ms(visibility: float) -> int:
    """The per-consumer acknowledgement timeout for a subscription.

    RabbitMQ >= 3.11.15 honours ``x-consumer-timeout`` on ``basic.consume`` (older servers
    ignore it and apply the global ``consumer_timeout``). Twice the visibility covers a handler
    that runs to its timeout plus the time its message waited in the prefetch buffer; it is
    never set below the broker's 30-minute default, because when it fires RabbitMQ closes the
    whole channel and requeues every unacked delivery on it.
    """
    return int(max(2 * visibility, MIN_CONSUMER_TIMEOUT) * 1000)


class AmqpSubscription(Subscription):
    """One channel, one consumer, ``basic.qos(prefetch)``; resumes after a reconnect."""

    def __init__(self, broker: BrokerLink, topic: str, prefetch: int, visibility: float) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.broker = broker
        self.topic = topic
        self.prefetch = prefetch
        self.visibility = visibility
        # (window, tag, body, properties, redelivered); None: closed
        self._buffer: asyncio.Queue[_Received | None] = asyncio.Queue()
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractQueue | None = None
        self._ctag: str | None = None
        self._window: AckWindow | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._in_flight = 0  # yielded, not yet settled or expired

    async def _start(self) -> None:
        async with self._start_lock:
            if self._channel is not None or self._closed:
                return
            connection = await self.broker._connected()
            await self.broker._ensure_topology(self.topic)
            channel = connection.channel(publisher_confirms=False)
            try:
                with map_errors("connect"):
                    await channel.initialize()
                    await channel.set_qos(prefetch_count=self.prefetch)
                    args = topology(self.topic, self.broker.options.queue_type)[0][1]
                    # Robust: re-declared and re-consumed (same tag) when the channel reopens.
                    queue = await channel.declare_queue(self.topic, durable=True, arguments=args)
                    self._ctag = await queue.consume(
                        self._on_message,
                        no_ack=False,
                        arguments={"x-consumer-timeout": consumer_timeout_ms(self.visibility)},
                    )
                    self._take_over(await channel.get_underlay_channel())
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            # The robust channel consumes again after a reconnect, through aio-pika's path.
            channel.reopen_callbacks.add(self._on_reopen)
            self._channel, self._queue = channel, queue

    # Two ways in. aio-pika's consumer path costs two tasks and an IncomingMessage (whose
    # attribute checks alone cost more than oncely's whole header parsing) per message; the
    # fast path is aiormq's single task per message straight into the buffer. aio-pika keeps
    # registering, and after a reconnect re-registering, the consumer (so its recovery logic
    # stays in charge); right after each registration this subscription swaps its own
    # callback in for aio-pika's on that aiormq channel. Messages that arrive before the swap,
    # or if it ever cannot happen, take aio-pika's path, which ends in the same buffer.

    def _take_over(self, raw: aiormq.abc.AbstractChannel) -> None:
        consumers = getattr(raw, "consumers", None)
        if isinstance(consumers, dict) and self._ctag in consumers:
            consumers[self._ctag] = self._on_delivered

    async def _on_reopen(self, channel: AbstractRobustChannel | None, /) -> None:
        channel = channel or self._channel
        if channel is None:
            return
        try:
            self._take_over(await channel.get_underlay_channel())
        except Exception:
            # Not fatal: deliveries keep arriving through aio-pika's own callback.
            log.warning("AMQP consumer on %r stays on the slow path", self.topic, exc_info=True)

    async def _on_delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        channel = message.channel
        if channel.is_closed:
            return  # the broker requeues it with the channel
        props = message.header.properties
        tag = message.delivery_tag or 0
        window = self._accept(channel, tag, message.body, props, bool(message.redelivered))
        if window is not None:
            await window.requeue(tag)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            raw = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return  # its channel died: the broker requeues it
        tag = message.delivery_tag or 0
        props = props_of(message)
        window = self._accept(raw, tag, message.body, props, bool(message.redelivered))
        if window is not None:
            await window.requeue(tag)

    def _accept(
        self,
        raw: aiormq.abc.AbstractChannel,
        tag: int,
        body: bytes,
        props: Basic.Properties,
        redelivered: bool,
    ) -> AckWindow | None:
        """Buffer one message; return its window if it must be handed back instead."""
        window = self._window
        if window is None or window.channel is not raw:
            window = self._window = AckWindow(raw, batch=self.broker.options.batch_acks)
        window.unsettled.add(tag)
        if self._closed:  # arrived between basic.cancel and cancel-ok
            return window
        self._buffer.put_nowait((window, tag, body, props, redelivered))
        return None

    async def __anext__(self) -> AmqpDelivery:
        if self._channel is None and not self._closed:
            await self._start()
        while True:
            if self._closed and self._buffer.empty():
                raise StopAsyncIteration
            item = await self._buffer.get()
            if item is None:
                raise StopAsyncIteration
            window = item[0]
            if window.closed:
                continue  # stale tag: the broker already requeued this message
            self._in_flight += 1
            return AmqpDelivery(self, *item)

    def shutdown(self) -> None:
        """The broker closed: stop iterating. Its deliveries expire with the connection."""
        self._closed = True
        self._buffer.put_nowait(None)

    async def release(self) -> None:
        self._in_flight -= 1
        if self._closed and self._in_flight == 0:
            await self._close_channel()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel = self._channel
        if self._queue is not None and self._ctag is not None and channel and not channel.is_closed:
            with contextlib.suppress(BrokerError), map_errors("connect"):
                await asyncio.wait_for(self._queue.cancel(self._ctag), 10)
        while not self._buffer.empty():
            item = self._buffer.get_nowait()
            if item is not None:
                await item[0].requeue(item[1])
        self._buffer.put_nowait(None)
        if self._in_flight == 0:
            await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # best effort: closing the connection also does
                await channel.close()
