"""One heartbeat per handler: extends visibility and renews leases of every running delivery.

A single timer task per handler, rather than one per message, keeps the hot path free of a
task creation and cancellation per delivery; it ticks every third of the visibility window and
extends everything that is running at that moment.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely.errors import BrokerError, LeaseLost, NotSupported, StoreError

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.stores.base import IdempotencyStore

__all__ = ["Active", "Heartbeat"]

log = logging.getLogger("oncely.worker")


@dataclass(slots=True, eq=False)
class Active:
    """A running handler, as the heartbeat and the timeout see it."""

    delivery: Delivery
    task: asyncio.Task[Any] | None
    lease_key: str | None = None
    lease_token: str | None = None
    timed_out: bool = False
    lease_lost: bool = False

    def expire(self) -> None:
        """The handler's timeout fired: cancel it, remembering why."""
        self.timed_out = True
        if self.task is not None:
            self.task.cancel()


class Heartbeat:
    """Keeps every running delivery of one handler visible and its lease alive.

    Args:
        name: the handler name, for logs.
        visibility: seconds of visibility (and lease) granted at each beat.
        extend: whether the broker supports ``Delivery.extend``.
        store: the store whose leases to renew, or ``None``.
    """

    def __init__(
        self, name: str, visibility: float, *, extend: bool, store: IdempotencyStore | None
    ) -> None:
        self.name = name
        self.visibility = visibility
        self.interval = visibility / 3
        self.extend = extend
        self.store = store
        self._active: set[Active] = set()
        self._task: asyncio.Task[None] | None = None

    def track(self, active: Active) -> None:
        if self._task is None and (self.extend or self.store is not None):
            self._task = asyncio.create_task(self._run(), name=f"heartbeat:{self.name}")
        self._active.add(active)

    def untrack(self, active: Active) -> None:
        self._active.discard(active)

    async def aclose(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._active:
                await asyncio.gather(*(self._beat(a) for a in list(self._active)))

    async def _beat(self, active: Active) -> None:
        delivery = active.delivery
        if self.extend and not delivery.settled:
            try:
                await delivery.extend(self.visibility)
            except NotSupported:
                self.extend = False
            except BrokerError as exc:
                if not delivery.settled:
                    log.warning("%s: could not extend %s: %s", self.name, delivery.id, exc)
        if active.lease_key is None or active.lease_token is None or self.store is None:
            return
        try:
            await self.store.renew(active.lease_key, active.lease_token, self.visibility)
        except LeaseLost:
            if active in self._active:
                # Someone else runs this key now; running on would duplicate the effect.
                log.error("%s: lease on %s lost; cancelling", self.name, active.lease_key)
                active.lease_lost = True
                if active.task is not None:
                    active.task.cancel()
        except StoreError as exc:
            log.warning("%s: could not renew lease %s: %s", self.name, active.lease_key, exc)
