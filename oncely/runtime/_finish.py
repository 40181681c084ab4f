"""Settling the outcome of a run that is over, whatever cancel arrives meanwhile.

Once a handler has run, its outcome (the completion recorded and the ack, or the lease
released and the nack) must be settled whole: a shutdown cancel arriving halfway would
otherwise turn a finished effect into a give-back (the effect runs again) or a failure into a
deferral (the attempt is not spent). ``Finisher`` runs each such settle shielded, and keeps
the ones a cancel handed off, so the runner neither settles their delivery a second time nor
closes before they end.

Where it can, the settle runs on the delivery's own task (``whole``) instead of a task per
message. That is only safe where no call in it cancels its own task: ``whole`` takes such a
cancel (an ``asyncio.timeout`` firing inside a store or broker call; on Python 3.12+ every
``wait_for``) for the caller's, and hands the rest on without it, waiting for ever on what
timed out. So:

- every settle of the in-process backends (the memory broker and store) runs there: they
  never enter a timeout;
- a success (record, then ack) runs there too when the broker and the store vouch that
  ``ack`` and ``complete`` never cancel their caller (``Broker.ack_on_caller``,
  ``IdempotencyStore.complete_on_caller``), as the shipped ones do by batching their I/O on
  tasks of their own; a failure's nack may still republish under a timeout (AMQP does);
- everything else runs on a task of its own from the start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any

from oncely.brokers.memory import MemoryBroker
from oncely.runtime._whole import whole
from oncely.stores.memory import MemoryStore

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery
    from oncely.runtime.stats import Stats
    from oncely.stores.base import IdempotencyStore

log = logging.getLogger("oncely.worker")


class Finisher:
    """Runs one handler's settles of runs that are over (see the module docstring).

    Args:
        broker: the worker's broker.
        store: the worker's store, if any.
        name: the handler's name, for logs.
        stats: the worker's counters; a settle handed on that fails counts as an internal
            error, as it does on the delivery's own task.
    """

    def __init__(
        self, broker: Broker, store: IdempotencyStore | None, name: str, stats: Stats
    ) -> None:
        self._name = name
        self._stats = stats
        self.inline = settles_inline(broker, store)
        self.inline_success = self.inline or (
            vouched(broker, "ack_on_caller", "consume")
            and (store is None or vouched(store, "complete_on_caller", "complete"))
        )
        self._handed: dict[asyncio.Task[object], Delivery] = {}
        self.handed = self._handed
        """Settles handed on (task -> delivery), read-only: empty nearly always, so the
        runner checks it before calling ``task_of`` once per delivery."""

    def __call__(
        self, settling: Coroutine[Any, Any, object], delivery: Delivery, *, success: bool = False
    ) -> Awaitable[object]:
        """Await this to await ``settling`` (the outcome of a run that is over; ``success``
        when it only records a completion and acks) shielded from cancellation. If cancelled
        meanwhile, it runs on: ``has`` and ``task_of`` see it, and ``wait`` waits for it."""
        if self.inline_success if success else self.inline:
            return whole(settling, self._hand_off, delivery)
        return self._shielded(settling, delivery)

    def resume(
        self, settling: Coroutine[Any, Any, object], waiting: Any, delivery: Delivery
    ) -> Awaitable[object]:
        """As ``self(settling, delivery, success=True)`` where that would run it on the
        caller's task (``inline_success``), for a ``settling`` whose first step the caller
        ran itself: it yielded ``waiting``."""
        return whole(settling, self._hand_off, delivery, waiting)

    def has(self, delivery: Delivery) -> bool:
        """Whether a cancel handed ``delivery``'s settle on and it still runs."""
        return self.task_of(delivery) is not None

    def task_of(self, delivery: Delivery) -> asyncio.Task[object] | None:
        """The task a cancel handed ``delivery``'s settle to, while it runs."""
        if not self._handed:  # nearly always: asked once per delivery
            return None
        for task, settling in self._handed.items():
            if settling is delivery:
                return task
        return None

    async def wait(self) -> None:
        """Wait for every settle handed on; call once no delivery of the handler runs. A
        failed one was reported when it ended (``_ended``)."""
        if self._handed:
            await asyncio.gather(*self._handed, return_exceptions=True)

    def _hand_off(self, task: asyncio.Task[object], delivery: Delivery) -> None:
        self._handed[task] = delivery
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[object]) -> None:
        delivery = self._handed.pop(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            # A runtime bug, as run() reports one on the delivery's own task; unsettled, the
            # delivery comes back after its visibility. Nobody else awaits this task.
            self._stats.internal_errors += 1
            log.error(
                "%s: internal error settling %s after a cancel; it comes back after its visibility",
                self._name,
                delivery.id,
                exc_info=exc,
            )

    async def _shielded(self, settling: Coroutine[Any, Any, object], delivery: Delivery) -> None:
        task = asyncio.ensure_future(settling)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._hand_off(task, delivery)
            raise


def settles_inline(broker: Broker, store: IdempotencyStore | None) -> bool:
    """Whether every settle on these backends may run on the delivery's task: only the
    in-process ones are known never to enter an ``asyncio.timeout``."""
    return type(broker) is MemoryBroker and (store is None or type(store) is MemoryStore)


def vouched(backend: object, flag: str, method: str) -> bool:
    """``backend``'s ``flag``, if it was set on the class that defines the ``method`` that runs
    or on a subclass of it: a subclass that overrides the method (a test store adding a
    timeout, a user's wrapper) vouches for nothing until the flag is set again."""
    mro = type(backend).__mro__
    setter = next((i for i, c in enumerate(mro) if flag in vars(c)), None)
    definer = next((i for i, c in enumerate(mro) if method in vars(c)), None)
    if setter is None or definer is None or setter > definer:
        return False
    return bool(vars(mro[setter])[flag])
