"""The consuming half of ``SqsBroker``: long-polling subscription and deliveries."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import TYPE_CHECKING

from oncely.brokers._sqs_delivery import SqsDelivery
from oncely.brokers._sqs_errors import is_missing_queue
from oncely.brokers._sqs_wire import MAX_VISIBILITY
from oncely.brokers.base import Subscription
from oncely.errors import (
    BrokerError,
    ConfigError,
    OncelyError,
)

if TYPE_CHECKING:
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

    from oncely.brokers._sqs_link import BrokerLink

__all__ = ["SqsDelivery", "SqsSubscription"]

log = logging.getLogger("oncely.brokers.sqs")


class SqsSubscription(Subscription):
    """Long-polls one queue with ``ceil(prefetch / 10)`` pollers (at most ``max_pollers``),
    each receiving up to 10 messages and never more than the free prefetch slots.

    On a FIFO queue one receive can return several messages of one group; only the first is
    yielded, the rest wait here until it is settled, so a group runs in order.
    """

    def __init__(self, broker: BrokerLink, topic: str, prefetch: int, visibility: float) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.broker = broker
        self.topic = topic
        self.prefetch = prefetch
        self.visibility = max(1, min(math.ceil(visibility), MAX_VISIBILITY))
        self._free = prefetch
        self._ready: collections.deque[SqsDelivery] = collections.deque()
        self._held: dict[str, collections.deque[SqsDelivery]] = {}
        self._busy: dict[str, int] = {}
        self._batches = 0
        self._pollers: list[asyncio.Task[None]] = []
        # What an asyncio.Event would do, without its loop look-up (a ``getpid`` system call
        # on Python 3.11) each time __anext__ has to wait.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        # Pollers waiting for free prefetch slots, and whether one was woken and has not run
        # yet: pollers are woken one at a time (see _wake).
        self._sleepers: collections.deque[asyncio.Future[None]] = collections.deque()
        self._waking = False
        self._error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------------- iteration

    async def __anext__(self) -> SqsDelivery:
        if not self._pollers and not self._closed:
            self._start()
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._ready:
                return self._ready.popleft()
            if self._error is not None:
                raise self._error
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise

    def take_ready(self) -> SqsDelivery | None:
        """The next received delivery if one is ready now, else ``None`` (then ``__anext__``
        waits): the consume loop takes the rest of a receive's batch without a coroutine
        each."""
        if self._ready and not self._closed:
            return self._ready.popleft()
        return None

    def _changed(self) -> None:
        """Wake every ``__anext__`` waiting: something is ready, failed or closed."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        n = min(math.ceil(self.prefetch / 10), self.broker.options.max_pollers)
        for i in range(n):
            task = asyncio.create_task(self._poll(), name=f"sqs-poll:{self.topic}:{i}")
            task.add_done_callback(self._poller_done)
            self._pollers.append(task)

    def _poller_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("%s: SQS poller died", self.topic, exc_info=exc)
        if isinstance(exc, OncelyError):
            self._error = exc
        else:
            self._error = BrokerError(f"SQS poller died: {type(exc).__name__}: {exc}")
            self._error.__cause__ = exc
        self._changed()

    async def _poll(self) -> None:
        loop = self._loop or asyncio.get_running_loop()
        pause = 0.1
        while not self._closed:
            while self._free <= 0:
                waiter: asyncio.Future[None] = loop.create_future()
                self._sleepers.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        # Woken, then cancelled before it ran: pass the wake-up on.
                        self._waking = False
                        self._wake()
                    raise
                self._waking = False
            n = min(10, self._free)
            self._free -= n
            if self._free > 0:
                self._wake()  # more slots than this receive takes: the next poller
            receive = loop.create_task(self.broker._receive(self.topic, n, self.visibility))
            try:
                # Shielded: a long poll cut off at the client may still claim messages on the
                # server; aclose lets it finish and hands back what it got.
                url, messages = await asyncio.shield(receive)
            except ConfigError:
                self._free += n
                raise
            except BrokerError as exc:
                self._free += n
                if is_missing_queue(exc):
                    self.broker._forget(self.topic)
                log.warning("%s: receive failed, retrying in %.1fs: %s", self.topic, pause, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            except asyncio.CancelledError:
                self._free += n
                # Closing: the receive finishes in the background and hands back its catch.
                self.broker._spawn(self._return_late(receive))
                raise
            except BaseException:
                self._free += n
                raise
            pause = 0.1
            self._free += n - len(messages)
            now = time.monotonic()
            self._batches += 1
            batch = self._batches
            for message in messages:
                delivery = SqsDelivery(self, url, message, now, batch)
                if delivery.group is None:
                    self._ready.append(delivery)
                else:
                    self._accept(delivery)
            if messages:
                self._changed()

    def _accept(self, delivery: SqsDelivery) -> None:
        group = delivery.group
        if group is None:
            self._ready.append(delivery)
            return
        busy = self._busy.get(group)
        if busy == delivery.batch:
            self._held.setdefault(group, collections.deque()).append(delivery)
            return
        if busy is not None:
            # SQS handed out this group again, so what this subscription still holds of it
            # from an earlier receive has expired: those receipt handles are stale.
            stale = self._held.pop(group, ())
            for d in stale:
                d._holding = False
            self._release(len(stale))
        self._busy[group] = delivery.batch
        self._ready.append(delivery)

    def _settled(self, delivery: SqsDelivery, *, returned: bool) -> None:
        """A yielded delivery was settled: free its slot; on FIFO, release its group."""
        # _release(1) inlined: once per message.
        self._free += 1
        if self._sleepers and not self._waking:
            self._wake()
        group = delivery.group
        if group is None or self._busy.get(group) != delivery.batch:
            return
        held = self._held.get(group)
        if not held:
            self._held.pop(group, None)
            del self._busy[group]
            return
        if returned:
            # SQS would redeliver the nacked message only after these; give them back too,
            # so the group's order holds on the next receive.
            del self._held[group]
            del self._busy[group]
            self._give_back(list(held))
            return
        nxt = held.popleft()
        if not held:
            del self._held[group]
        # Through the broker: the task is kept referenced and a failure is logged.
        self.broker._spawn(self._release_held(nxt))

    async def _release_held(self, delivery: SqsDelivery) -> None:
        """Hand on the next message of a group, renewing its visibility if it waited long."""
        try:
            if time.monotonic() - delivery.received > self.visibility / 2:
                await delivery.extend(self.visibility)
        except BrokerError as exc:
            log.info("%s: held FIFO message %s lapsed: %s", self.topic, delivery.id, exc)
            if delivery._holding:
                delivery._holding = False
                self._settled(delivery, returned=True)
            return
        if self._closed:
            self._give_back([delivery])
            return
        self._ready.append(delivery)
        self._changed()

    def _release(self, n: int) -> None:
        self._free += n
        self._wake()

    def _wake(self) -> None:
        """Wake one sleeping poller, if slots are free and none is already on its way. Not
        all of them (as an event would): a batch of acks frees its slots in one loop turn,
        the first poller to run takes up to 10 of them, and the rest would go back to sleep,
        a future and a task step each (several per receive, measured). A woken poller that
        leaves slots free wakes the next."""
        if self._waking or self._free <= 0:
            return
        sleepers = self._sleepers
        while sleepers:
            waiter = sleepers.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking = True
                return

    def _give_back(self, deliveries: list[SqsDelivery]) -> None:
        """Make never-yielded deliveries visible again (visibility 0), in the background."""
        if not deliveries:
            return
        for d in deliveries:
            d._done = True
            d._holding = False
        self._release(len(deliveries))
        self.broker._spawn(self._return(deliveries))

    async def _return(self, deliveries: list[SqsDelivery]) -> None:
        results = await asyncio.gather(
            *(self.broker._change_visibility(d.queue_url, d.receipt, 0) for d in deliveries),
            return_exceptions=True,
        )
        for d, result in zip(deliveries, results, strict=True):
            if isinstance(result, BaseException):
                # Not lost: it comes back when its visibility runs out.
                log.info("%s: could not hand back %s: %s", self.topic, d.id, result)

    # --------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Stop polling and make buffered, never-yielded messages visible at once.

        A long poll in flight is not cut off (the server could still hand it messages): it
        finishes in the background, within ``wait`` seconds, and what it got is handed back.
        """
        if self._closed:
            return
        self._closed = True
        pollers, self._pollers = self._pollers, []
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        buffered = list(self._ready)
        for held in self._held.values():
            buffered.extend(held)
        self._ready.clear()
        self._held.clear()
        self._busy.clear()
        if buffered:
            for d in buffered:
                d._done = True
                d._holding = False
            self._release(len(buffered))
            await self._return(buffered)
        self._changed()

    async def _return_late(self, receive: asyncio.Future[tuple[str, list[MessageTypeDef]]]) -> None:
        try:
            url, messages = await receive
        except BrokerError:
            return
        now = time.monotonic()
        late = [SqsDelivery(self, url, m, now) for m in messages]
        for d in late:
            d._done = True
            d._holding = False
        await self._return(late)

    def shutdown(self) -> None:
        """The broker is closing: stop polling now (buffered messages come back by expiry)."""
        self._closed = True
        for task in self._pollers:
            task.cancel()
        self._changed()
