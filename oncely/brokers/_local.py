"""Waiting and settle bookkeeping shared by the brokers that run in this process (memory and
SQLite): a subscription parks on a future that a publish, a settle or ``aclose`` resolves, and
a delivery frees its prefetch slot exactly once, whatever its first settle attempt ended in:
settled, lease gone, or an error (the file was locked past the busy timeout, the broker was
closed). A message whose settle failed is still claimed by this delivery, so the broker hands
it out again once its visibility runs out; the slot must not wait for that, or a subscription
whose every slot met a failed settle would park for ever."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from oncely.brokers.base import Delivery, Subscription
from oncely.errors import AlreadySettled, ConfigError, DeliveryExpired

__all__ = [
    "LocalDelivery",
    "LocalSubscription",
    "check_delay",
    "check_topic",
    "resolve",
    "wake_all",
]


def resolve(fut: asyncio.Future[bool], value: bool) -> None:
    """Complete ``fut`` with ``value`` unless it is done already."""
    if fut.done():
        return
    try:
        fut.set_result(value)
    except RuntimeError:
        # Its loop has closed (a shared memory hub outlives event loops); nobody waits on it.
        pass


def wake_all(waiters: set[asyncio.Future[bool]]) -> None:
    for fut in waiters:
        resolve(fut, True)
    waiters.clear()


def check_topic(topic: str) -> None:
    # No handler can consume "" (App.handler refuses it): a message published there is lost.
    if not isinstance(topic, str) or not topic:
        raise ConfigError(f"topic must be a non-empty string, got {topic!r}")


def check_delay(delay: float, name: str = "delay") -> None:
    # Also refuses NaN, which would corrupt a heap or a deadline, and infinity: with no
    # max_delay to stop it, the message would never become visible again.
    if not 0 <= delay < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {delay}")


class LocalSubscription(Subscription):
    """Prefetch accounting and parking for one consumer of ``topic``."""

    def __init__(self, topic: str, prefetch: int, visibility: float) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if visibility <= 0:
            raise ValueError(f"visibility must be > 0, got {visibility}")
        self.topic = topic
        self.prefetch = prefetch
        self.visibility = visibility
        self.unsettled = 0
        """Deliveries yielded and not yet settled (nor found expired)."""
        self.closed = False
        self._waiter: asyncio.Future[bool] | None = None

    async def park(self, waiters: set[asyncio.Future[bool]] | None, seconds: float | None) -> bool:
        """Sleep until woken through ``waiters`` (a publish), a freed slot or close (True), or
        until ``seconds`` pass (False)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiter = fut
        if waiters is not None:
            waiters.add(fut)
        timer = loop.call_later(seconds, resolve, fut, False) if seconds is not None else None
        try:
            return await fut
        finally:
            self._waiter = None
            if waiters is not None:
                waiters.discard(fut)
            if timer is not None:
                timer.cancel()

    def interrupt(self) -> None:
        """Wake a parked ``__anext__`` so it re-checks its state."""
        if self._waiter is not None:
            resolve(self._waiter, True)

    def release_slot(self) -> None:
        self.unsettled -= 1
        self.interrupt()


class LocalDelivery(Delivery):
    """A delivery whose outcome is known when its settle call returns."""

    __slots__ = ("_done", "_settled", "_sub")

    def __init__(self, sub: LocalSubscription, **fields: Any) -> None:
        super().__init__(topic=sub.topic, **fields)
        self._sub = sub
        self._settled = False
        self._done = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _check(self) -> None:
        if self._settled:
            raise AlreadySettled(f"message {self.id} was already settled")

    async def _settle(self, attempt: Callable[[], Awaitable[bool]]) -> None:
        """Run one settle attempt (True if it took effect, False if the lease was lost).

        The prefetch slot is freed however the attempt ends, exceptions and cancellation
        included; only success marks the delivery settled, so a caller may try again, and
        otherwise the message is redelivered when its visibility runs out.

        Raises:
            AlreadySettled: a settle succeeded before.
            DeliveryExpired: the lease was lost; the message was claimed again.
            ConnectionLost: the broker failed; the message comes back after its visibility.
        """
        self._check()
        try:
            ok = await attempt()
        finally:
            self._release()
        if not ok:
            raise DeliveryExpired(f"message {self.id}: visibility ran out and it was re-claimed")
        self._settled = True

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._sub.release_slot()

    def _expired(self) -> None:
        """``extend`` found the lease gone: free the slot and say so."""
        self._release()
        raise DeliveryExpired(f"message {self.id}: visibility ran out and it was re-claimed")
