"""One handler's consume loop, supervised, and the pool of tasks that runs its deliveries.

The policy is in ``oncely.runtime.worker``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from oncely._logging import MESSAGE
from oncely.errors import BrokerError, ConfigError, NotSupported
from oncely.runtime._settle import is_settled

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery, Subscription
    from oncely.runtime._process import Runner
    from oncely.runtime.stats import Stats

log = logging.getLogger("oncely.worker")

RESUBSCRIBE_DELAY = (0.1, 5.0)
"""First and largest pause before re-subscribing after the broker failed a fetch."""

MAX_UNEXPECTED = 5
"""Unexpected consume failures in a row (no delivery between them) that stop the worker."""

_FATAL = (ConfigError, NotSupported, ValueError, TypeError)
"""Consume errors no retry can fix: they stop the worker."""


PULL_RUN = 32
"""Most deliveries a task takes itself (``Pool.source``) in a row before it lets the event
loop run once."""


class Pool:
    """Runs one handler's deliveries, at most ``size`` at a time, on long-lived tasks.

    A task per delivery cost about as much as the rest of the runtime's per-message work on a
    fast broker (cProfile: creating, scheduling and reaping it, its done callback, and a
    semaphore). Here a task, once its delivery is settled, waits for the next one instead;
    where the subscription can hand over a ready delivery without waiting (``source``, the
    Kafka subscription's ``next_ready``), the task takes it itself, sparing the hand-over.

    Each task runs one delivery at a time, so cancelling it still cancels just that handler:
    the timeout and a lost lease do (the runner uncancels the task and settles the delivery),
    and so does the worker once the shutdown grace is over. A delivery starts with the context
    variables its task started with: a task after whose delivery a context variable changed,
    or a cancel request is still pending, ends and a fresh task takes the next delivery, so
    nothing leaks from one delivery into another.

    A handler that raises ``KeyboardInterrupt`` or ``SystemExit`` (``sys.exit()``) has its
    message settled as a failure by the runner, which then raises it on; the task ends there and
    hands it to ``on_exit``, which stops the worker as ``stop()`` does and raises it once the
    others are drained. Without ``on_exit`` it goes on up the task at once. The worker then
    sets ``halted``: a delivery handed to a task that has not started it yet (the consume loop
    ran earlier in the same pass of the event loop) is given back rather than run.

    Args:
        runner: the handler's runner; ``Runner.run`` settles every delivery.
        size: how many deliveries may be in flight (the handler's concurrency).
        on_exit: called with a ``KeyboardInterrupt`` or ``SystemExit`` a handler raised.
    """

    def __init__(
        self,
        runner: Runner,
        size: int,
        *,
        on_exit: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.runner = runner
        self.size = size
        self.on_exit = on_exit
        self.in_flight = 0
        """Deliveries handed to the pool and not yet finished."""
        self.halted = False
        """Set once a handler asked the worker to exit: a delivery handed over from now on is
        given back, not started (see the class docstring)."""
        self._loop = asyncio.get_running_loop()
        self._idle: list[asyncio.Future[Delivery | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._room: asyncio.Future[None] | None = None
        self._closed = False
        self._name = f"oncely:{runner.spec.name}"
        self.source: Callable[[], Delivery | None] | None = None
        """Set by the consume loop while its subscription is open: the subscription's next
        delivery if one is ready now, without waiting (``next_ready``), else ``None``."""

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        """The pool's tasks, idle or running a delivery."""
        return set(self._tasks)

    async def wait_room(self) -> None:
        """Wait until fewer than ``size`` deliveries are in flight."""
        while self.in_flight >= self.size:
            self._room = self._loop.create_future()
            await self._room

    def put(self, delivery: Delivery) -> None:
        """Run ``delivery`` on an idle task, or a new one. Call only when there is room."""
        self.in_flight += 1
        idle = self._idle
        while idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(delivery)
                return
        task = self._loop.create_task(self._work(delivery), name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def close(self) -> None:
        """Take no more deliveries: idle tasks end now, the others after their delivery."""
        self._closed = True
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()

    def _finished(self) -> None:
        self.in_flight -= 1
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    async def _work(self, delivery: Delivery) -> None:
        runner = self.runner
        task = asyncio.current_task()
        assert task is not None
        # Runner.run leaves an emptied list in MESSAGE after each delivery: start with one,
        # so the context after a delivery compares equal to this one.
        MESSAGE.set([])
        context = contextvars.copy_context()
        pulled = 0  # deliveries this task took itself since it last let the loop run
        try:
            if self.halted:
                await self._hand_back(delivery)
                return
            while True:
                try:
                    await runner.run(delivery, task)
                except Exception:
                    # Runner.run settles everything itself; this is the last line for a bug.
                    log.exception("%s: unexpected error", runner.spec.name)
                except (KeyboardInterrupt, SystemExit) as exc:
                    # Raised by the handler, its message settled: the worker is to stop.
                    self._finished()
                    if self.on_exit is None:
                        raise
                    log.warning("%s: the handler raised %r; stopping", runner.spec.name, exc)
                    self.on_exit(exc)
                    return
                except BaseException:
                    self._finished()
                    raise
                if pulled >= PULL_RUN:
                    # A handler that never awaits (and Kafka's acks, which do not) would
                    # otherwise run every ready record in a row, the event loop starved of
                    # its I/O, timers and the client's group heartbeats meanwhile.
                    pulled = 0
                    try:
                        await asyncio.sleep(0)
                    except BaseException:
                        self._finished()
                        raise
                if self._closed or task.cancelling() or contextvars.copy_context() != context:
                    self._finished()
                    return
                try:
                    ready = None if (source := self.source) is None else source()
                except Exception:  # the consume loop meets the same failure and handles it
                    log.exception("%s: taking a ready delivery failed", runner.spec.name)
                    ready = None
                if ready is not None:
                    # The slot passes straight to the next delivery: no hand-over through a
                    # future and the consume loop's task (a wake-up of each per record).
                    delivery = ready
                    pulled += 1
                    continue
                pulled = 0
                # self._finished() inlined: once per delivery.
                self.in_flight -= 1
                room = self._room
                if room is not None and not room.done():
                    room.set_result(None)
                waiter: asyncio.Future[Delivery | None] = self._loop.create_future()
                self._idle.append(waiter)
                try:
                    handed = await waiter
                except asyncio.CancelledError:
                    await self._give_back(waiter)
                    raise
                if handed is None:
                    return
                if self.halted:
                    await self._hand_back(handed)
                    return
                delivery = handed
        finally:
            self._tasks.discard(task)

    async def _give_back(self, waiter: asyncio.Future[Delivery | None]) -> None:
        """Cancelled while idle: a delivery handed over just before goes straight back."""
        if waiter in self._idle:
            self._idle.remove(waiter)
        if waiter.cancelled() or waiter.result() is None:
            return
        delivery = waiter.result()
        assert delivery is not None
        await self._hand_back(delivery)

    async def _hand_back(self, delivery: Delivery) -> None:
        """Give back a delivery handed over and never started."""
        runner = self.runner
        try:
            if not is_settled(delivery):
                # As Runner.run gives back a delivery cancelled before its handler ran.
                await runner._finish(runner.settle.nack(delivery, 0.0, defer=True), delivery)
        finally:
            self._finished()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: a handler task died", self.runner.spec.name, exc_info=task.exception())


class ConsumeLoop:
    """Fetches deliveries of one handler's topic while the pool has room, and hands them on.

    Args:
        broker: the connected broker.
        runner: the handler's runner.
        stopping: set when the worker stops; the loop then ends.
        stats: the worker's counters.
        pool: runs the deliveries; at most its ``size`` are in flight.
        fail: stops the worker loudly with a cause (the loop returns right after).
    """

    def __init__(
        self,
        broker: Broker,
        runner: Runner,
        stopping: asyncio.Event,
        stats: Stats,
        *,
        pool: Pool,
        fail: Callable[[str, BaseException], None],
    ) -> None:
        self.broker = broker
        self.runner = runner
        self.stopping = stopping
        self.stats = stats
        self.pool = pool
        self.fail = fail
        self._pulled = False
        """Whether the pool took a delivery itself since the last consume failure."""

    async def run(self) -> None:
        runner = self.runner
        spec = runner.spec
        # Without per-message extend, the broker's own redelivery timer must outlast the
        # handler, because no heartbeat can push it out.
        visibility = spec.visibility
        if not self.broker.capabilities.extend:
            visibility = max(visibility, spec.timeout * 1.5 + 5)
        pool = self.pool
        pause = RESUBSCRIBE_DELAY[0]
        unexpected = 0
        while not self.stopping.is_set():
            sub: Subscription | None = None
            try:
                sub = self.broker.consume(
                    spec.topic, prefetch=spec.concurrency, visibility=visibility
                )
                pool.source = self._source(sub)
                # Optional, as ``next_ready``: a delivery ready now, without a coroutine.
                take: Callable[[], Delivery | None] | None = getattr(sub, "take_ready", None)
                while True:
                    if pool.in_flight >= pool.size:
                        await pool.wait_room()
                    delivery = None if take is None else take()
                    if delivery is None:
                        delivery = await sub.__anext__()
                    pause, unexpected = RESUBSCRIBE_DELAY[0], 0
                    pool.put(delivery)
            except StopAsyncIteration:
                if self.stopping.is_set():
                    return
                log.warning("%s: subscription to %s ended; resubscribing", spec.name, spec.topic)
            except asyncio.CancelledError:
                raise
            except _FATAL as exc:
                self.fail(f"{spec.name}: consuming {spec.topic!r} cannot work", exc)
                return
            except BrokerError as exc:
                self.stats.consume_errors += 1
                if self._pulled:  # deliveries came through the pool's own pulls meanwhile
                    self._pulled, pause, unexpected = False, RESUBSCRIBE_DELAY[0], 0
                log.error(
                    "%s: consuming %s failed, resubscribing in %.1fs: %s",
                    spec.name,
                    spec.topic,
                    pause,
                    exc,
                )
            except Exception as exc:
                self.stats.consume_errors += 1
                if self._pulled:
                    self._pulled, pause, unexpected = False, RESUBSCRIBE_DELAY[0], 0
                unexpected += 1
                if unexpected >= MAX_UNEXPECTED:
                    self.fail(
                        f"{spec.name}: consuming {spec.topic!r} failed {unexpected} times in a row",
                        exc,
                    )
                    return
                log.exception(
                    "%s: consuming %s failed unexpectedly (%d in a row), resubscribing in %.1fs",
                    spec.name,
                    spec.topic,
                    unexpected,
                    pause,
                )
            finally:
                pool.source = None
                if sub is not None:
                    await asyncio.shield(_close_sub(sub))
            try:
                await asyncio.wait_for(self.stopping.wait(), pause)
            except TimeoutError:
                pause = min(pause * 2, RESUBSCRIBE_DELAY[1])

    def _source(self, sub: Subscription) -> Callable[[], Delivery | None] | None:
        """What the pool's tasks take ready deliveries from, if ``sub`` can hand them over
        without waiting (an optional ``next_ready`` callable, as the Kafka subscription has;
        ``None`` where it never can, so the tasks do not ask per delivery); none once the
        worker stops fetching."""
        next_ready: Callable[[], Delivery | None] | None = getattr(sub, "next_ready", None)
        if next_ready is None:
            return None
        stopping = self.stopping

        def source() -> Delivery | None:
            if stopping.is_set():
                return None
            delivery = next_ready()
            if delivery is not None:
                self._pulled = True
            return delivery

        return source


async def _close_sub(sub: Subscription) -> None:
    try:
        await sub.aclose()
    except Exception as exc:
        log.warning("closing a subscription failed: %r", exc)
