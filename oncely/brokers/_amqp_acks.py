"""Acknowledgements of one AMQP channel for ``AmqpSubscription``: a window of delivery tags,
acked one by one or coalesced into ``basic.ack(multiple=True)`` frames."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import aiormq.exceptions

from oncely.brokers._ack_after import withheld
from oncely.brokers._amqp_topology import map_errors
from oncely.errors import BrokerError, DeliveryExpired

if TYPE_CHECKING:
    import aiormq.abc

__all__ = ["AckWindow"]


class AckWindow:
    """The delivery tags of one AMQP channel instance and how they are acked.

    Delivery tags are per channel, so a reconnect starts a new window; acks for an old window
    fail with ``DeliveryExpired`` (its tags are void and the broker redelivers the messages).

    With batching, acks requested in the same event-loop turn are flushed together by one task:
    every requested tag below the lowest still-unsettled tag is covered by a single
    ``basic.ack(multiple=True)``; tags above it are acked one by one. ``multiple=True`` is only
    used when no lower tag on the channel is still unsettled (held by a handler, buffered, or
    about to be handed back with ``basic.nack(requeue=True)``), so it never acks a message this
    consumer did not finish. Flushes are serialised so frames leave in the order computed.

    An ack may come with a condition (``oncely.brokers._ack_after``): its flush waits for it,
    and a tag whose condition failed is left out of every frame, stays unsettled and its
    caller gets ``AckWithheld``. The flush waits holding the lock, so the channel's later acks
    wait behind it: as long as the store's reply takes, at most its own timeout (a store that
    hangs with no timeout holds them as long, where before only its own callers waited).
    """

    __slots__ = (
        "_batch",
        "_conditions",
        "_lock",
        "_ready",
        "_task",
        "_waiters",
        "channel",
        "unsettled",
    )

    def __init__(self, channel: aiormq.abc.AbstractChannel, *, batch: bool) -> None:
        self.channel = channel
        self.unsettled: set[int] = set()
        self._batch = batch
        self._ready: list[int] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._conditions: dict[int, asyncio.Future[Any]] | None = None  # tag -> condition
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self.channel.is_closed

    async def ack(self, tag: int, after: asyncio.Future[Any] | None = None) -> None:
        """Ack ``tag``; with ``after``, only once it is done without an error, else raise
        ``AckWithheld`` with nothing sent (``oncely.brokers._ack_after``)."""
        if self.closed:
            raise DeliveryExpired("the delivery's AMQP channel closed; it will be redelivered")
        if after is not None:
            if not self._batch:
                failed = await withheld({tag: after})
                if failed:
                    raise failed[tag]
            else:
                if self._conditions is None:
                    self._conditions = {}
                self._conditions[tag] = after
        if not self._batch:
            with map_errors("settle"):
                await self.channel.basic_ack(tag)
            self.unsettled.discard(tag)
            return
        self._ready.append(tag)
        # One future per caller, not one shared: a cancelled caller cancels only its own, and
        # the flush acks this tag all the same. (Cheaper than shielding a shared one.)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await waiter

    async def _run(self) -> None:
        waiters: list[asyncio.Future[None]] = []
        try:
            async with self._lock:
                self._task = None
                tags, self._ready = self._ready, []
                waiters, self._waiters = self._waiters, []
                conditions, self._conditions = self._conditions, None
                if conditions is not None:
                    failed = await withheld(conditions)
                    if failed:
                        # Left out of every frame, and unsettled: no multiple=True covers them.
                        kept = [i for i, tag in enumerate(tags) if tag not in failed]
                        for i, tag in enumerate(tags):
                            if tag in failed and not waiters[i].done():
                                waiters[i].set_exception(failed[tag])
                        tags = [tags[i] for i in kept]
                        waiters = [waiters[i] for i in kept]
                self.unsettled.difference_update(tags)
                low = min(self.unsettled, default=None)
                prefix = [t for t in tags if low is None or t < low]
                frames = [(t, False) for t in tags if low is not None and t > low]
                if prefix:
                    frames.insert(0, (max(prefix), len(prefix) > 1))
                with map_errors("settle"):
                    for i, (tag, multiple) in enumerate(frames):
                        last = i == len(frames) - 1
                        await self.channel.basic_ack(tag, multiple=multiple, wait=last)
        except BaseException as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def requeue(self, tag: int) -> None:
        """Hand an unyielded message back; the tag stays unsettled until the frame is out."""
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError, BrokerError):
            with map_errors("settle"):
                await self.channel.basic_nack(tag, requeue=True)
        self.unsettled.discard(tag)
