"""The consuming half of ``AmqpBroker``: the subscription; its deliveries are in
``_amqp_delivery`` and its batched acks in ``_amqp_acks``.

It reaches the broker through ``BrokerLink``, a protocol ``AmqpBroker`` satisfies, so this
module never imports ``oncely.brokers.amqp`` (which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import aiormq.exceptions

from oncely.brokers._amqp_acks import AckWindow
from oncely.brokers._amqp_delivery import AmqpDelivery, BrokerLink
from oncely.brokers._amqp_message import props_of
from oncely.brokers._amqp_topology import map_errors, topology
from oncely.brokers.base import Subscription
from oncely.errors import BrokerError

if TYPE_CHECKING:
    import aiormq.abc
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
    from pamqp.commands import Basic


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


log = logging.getLogger("oncely.brokers.amqp")

_Received = tuple["AckWindow", int, bytes, "Basic.Properties", bool]


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
