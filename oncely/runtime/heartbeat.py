"""One heartbeat per handler: extends visibility and renews leases of every running delivery,
and cancels those that run past the handler's timeout.

A single timer task per handler, rather than one per message, keeps the hot path free of a
task creation and cancellation per delivery; it ticks every third of the visibility window and
extends everything that is running at that moment.

The timeout is one timer per handler too, rather than a ``call_later`` armed and cancelled
per delivery: every delivery of a handler has the same timeout, so the one that started first
is the next to time out. The timer is armed for the oldest running delivery's deadline; when it
fires it cancels every delivery past its deadline and re-arms for the oldest one left. A
delivery that finishes early leaves the timer as it is (it then fires, finds nothing due and
moves on), so the hot path only reads the clock.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely._logging import MESSAGE
from oncely.errors import BrokerError, LeaseLost, NotSupported, StoreError

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime.stats import Stats
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
    deadline: float | None = None
    """The loop time at which the handler times out, or ``None`` if the heartbeat does not
    time it."""
    timed_out: bool = False
    lease_lost: bool = False

    def expire(self) -> None:
        """The handler's timeout fired: cancel it, remembering why."""
        self.timed_out = True
        if self.task is not None:
            self.task.cancel()


class Heartbeat:
    """Keeps every running delivery of one handler visible and its lease alive.

    A failing beat (any exception, from any backend) is logged, counted in
    ``Stats.heartbeat_errors`` and affects only its own delivery: the next beat tries it
    again, and the others are beaten meanwhile. The timer task itself is supervised: should
    it ever die, it is logged with its traceback and restarted.

    Args:
        name: the handler name, for logs.
        visibility: seconds of visibility (and lease) granted at each beat.
        extend: whether the broker supports ``Delivery.extend``.
        store: the store whose leases to renew, or ``None``.
        stats: the worker's counters.
    """

    def __init__(
        self,
        name: str,
        visibility: float,
        *,
        extend: bool,
        store: IdempotencyStore | None,
        stats: Stats,
    ) -> None:
        self.name = name
        self.visibility = visibility
        self.interval = visibility / 3
        self.extend = extend
        self.store = store
        self.stats = stats
        # Ordered by start, hence by deadline (one timeout per handler): the timer's work.
        self._active: dict[Active, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once. On Python 3.11 ``asyncio.get_running_loop()``
        (and ``current_task()`` without a loop) costs a ``getpid`` system call, twice per
        delivery on the hot path until cached here; a worker runs on one loop."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def current_task(self) -> asyncio.Task[Any] | None:
        """``asyncio.current_task()``, without its system call (see ``loop``)."""
        return asyncio.current_task(self._loop or self.loop())

    def track(self, active: Active, timeout: float | None = None) -> None:
        """Beat ``active`` until it is untracked and, with ``timeout``, ``expire()`` it once
        ``timeout`` seconds from now have passed. Every timed delivery of one heartbeat must
        have the same ``timeout`` (it is the handler's)."""
        if self._task is None and (self.extend or self.store is not None):
            self._start()
        self._active[active] = None
        if timeout is not None:
            loop = self._loop or self.loop()
            active.deadline = deadline = loop.time() + timeout
            if self._timer is None:
                # An armed timer is due no later than this deadline: it re-arms when it fires.
                self._timer = loop.call_at(deadline, self._time_out)

    def untrack(self, active: Active) -> None:
        self._active.pop(active, None)

    def _time_out(self) -> None:
        self._timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for active in list(self._active):
            deadline = active.deadline
            if deadline is None or active.timed_out:
                continue
            if deadline > now:
                self._timer = loop.call_at(deadline, self._time_out)
                return
            active.expire()

    async def aclose(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"heartbeat:{self.name}")
        self._task.add_done_callback(self._supervise)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if task is not self._task or self._closed:
            return
        # Cancelled but not by ``aclose`` (which clears ``_task`` first): someone else's
        # cancel, a death like any other. Left alone, ``_task`` stayed set, so nothing ever
        # started another and no delivery of the handler was beaten again.
        exc = None if task.cancelled() else task.exception()
        log.error(
            "%s: heartbeat died; restarting it",
            self.name,
            exc_info=exc or RuntimeError("cancelled" if task.cancelled() else "exited"),
        )
        self.stats.heartbeat_errors += 1
        self._task = None
        if self._active:
            self._start()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._active:
                await asyncio.gather(*(self._bounded(a) for a in list(self._active)))

    async def _bounded(self, active: Active) -> None:
        # Its own task (gather): log lines about this beat carry the delivery's fields.
        current: list[Any] = [self.name, active.delivery]
        if active.lease_key is not None:
            # The idempotency key the runtime extracted (the lease's key, less the handler's
            # prefix), as the run's own lines show it, not the message's header key.
            current.append(active.lease_key.removeprefix(f"{self.name}:"))
        MESSAGE.set(current)
        # A backend call that hangs must not hold up the next beat of every other delivery.
        try:
            await asyncio.wait_for(self._beat(active), self.interval)
        except TimeoutError:
            self._failed(active, "beat (timed out)", active.delivery.id)

    async def _beat(self, active: Active) -> None:
        """Beat one delivery; never raises (except on a cancel of this beat)."""
        try:
            await self._extend(active)
        except Exception:
            self._failed(active, "extend visibility of", active.delivery.id)
        except asyncio.CancelledError:
            if self._asked():
                raise
            self._failed(active, "extend visibility of", active.delivery.id)
        if active.lease_key is None or active.lease_token is None or self.store is None:
            return
        try:
            await self.store.renew(active.lease_key, active.lease_token, self.visibility)
        except asyncio.CancelledError:
            if self._asked():
                raise
            self._failed(active, "renew lease", active.lease_key)
        except LeaseLost:
            if active in self._active:
                # Someone else runs this key now; running on would duplicate the effect.
                log.error("%s: lease on %s lost; cancelling", self.name, active.lease_key)
                active.lease_lost = True
                if active.task is not None:
                    active.task.cancel()
        except Exception:
            self._failed(active, "renew lease", active.lease_key)

    async def _extend(self, active: Active) -> None:
        delivery = active.delivery
        if self.extend and not delivery.settled:
            try:
                extended = await delivery.extend(self.visibility)
            except NotSupported as exc:
                # Every delivery of the handler goes unextended from now on: say so once.
                if self.extend:
                    self.extend = False
                    log.warning(
                        "%s: the broker cannot extend visibility (%s); no delivery of this "
                        "handler is extended any more, so one running past %.0fs may be "
                        "delivered again meanwhile",
                        self.name,
                        exc,
                        self.visibility,
                    )
            else:
                if extended is not False:  # False: a no-op (a settle on its way, a cap)
                    self.stats.extensions += 1

    def _asked(self) -> bool:
        """Whether a ``CancelledError`` being handled in a beat is this beat's own cancel (its
        time limit, the heartbeat's close). Any other came from a backend call (one that
        cancels futures its callers await, as a batch task cut off does) and is that call's
        failure: raised on, it ended the heartbeat's task as if closed, so no delivery of
        the handler was beaten again, and nothing said so."""
        task = self.current_task()
        return task is not None and task.cancelling() > 0

    def _failed(self, active: Active, what: str, name: object) -> None:
        if active not in self._active:
            return  # finished meanwhile; the failure no longer matters
        self.stats.heartbeat_errors += 1
        exc = sys.exc_info()[1]
        if isinstance(exc, BrokerError | StoreError | TimeoutError):
            log.warning("%s: could not %s %s: %r", self.name, what, name, exc)
        else:
            log.exception("%s: could not %s %s", self.name, what, name)
