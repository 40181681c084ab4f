"""The worker's drain and close, the rest of a stop after ``Worker._halt``: wait for the
handlers in flight until the grace's deadline (which a later ``stop()`` may bring in), cancel
the rest, close the runners, run the shutdown hooks, close what the worker owns. A base of
``Worker``, kept apart to keep that module small; the attributes below are ``Worker``'s."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from oncely.errors import OncelyError

if TYPE_CHECKING:
    from oncely.brokers.base import Broker
    from oncely.runtime._consume import Pool
    from oncely.runtime._observe import Observer
    from oncely.runtime._process import Runner
    from oncely.runtime.app import App
    from oncely.runtime.http import Endpoints
    from oncely.runtime.publisher import Publisher
    from oncely.runtime.stats import Totals
    from oncely.stores.base import IdempotencyStore

log = logging.getLogger("oncely.worker")


class Drain:
    """How ``Worker`` drains and closes; the attributes below are ``Worker``'s."""

    app: App
    stats: Totals
    endpoints: Endpoints
    observer: Observer
    abandoned: set[asyncio.Task[None]]
    _loops: list[asyncio.Task[None]]
    _pools: list[Pool]
    _runners: list[Runner]
    _owned: list[Broker | IdempotencyStore]
    _publisher: Publisher | None
    _stopped: asyncio.Event | None
    _hurry: asyncio.Event | None
    _deadline: float

    @property
    def in_flight(self) -> int:
        """How many handlers are running now."""
        return sum(pool.in_flight for pool in self._pools)

    async def _wind_down(self, grace: float) -> None:
        """The rest of a stop, after ``_halt``: drain, close, mark the worker stopped."""
        assert self._stopped is not None
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Idle pool tasks end at once; busy ones after their delivery, or when cancelled here.
        for pool in self._pools:
            pool.close()
        if self.in_flight:
            log.info("draining %d in-flight handler(s), up to %.1fs", self.in_flight, grace)
        tasks = {task for pool in self._pools for task in pool.tasks}
        pending = await self._drain(tasks)
        if pending:
            log.warning("cancelling %d handler(s) still running after the grace", len(pending))
            for task in pending:
                task.cancel()
            # Each gives its message back now. One that ignores the cancel would hold stop()
            # (and a second signal) for ever: from here a later stop() sets how long to wait.
            self._deadline = math.inf
            self.abandoned = await self._drain(pending)
        if self.abandoned:
            log.error(
                "%d handler(s) ignored their cancel and still run; stopping without them "
                "(their messages come back after their visibility): %s",
                len(self.abandoned),
                ", ".join(sorted(task.get_name() for task in self.abandoned)),
            )
        for runner in self._runners:
            await runner.aclose()
        raised: BaseException | None = None
        for hook in reversed(self.app.shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook %r failed", hook)
            except BaseException as exc:
                # sys.exit(), KeyboardInterrupt or a cancel out of a hook: the hooks after it
                # are skipped, but the worker still closes what it owns and reads as stopped
                # (else wait_stopped(), and `oncely run` on a signal, waited for ever); then
                # the exception goes on.
                log.error(
                    "shutdown hook %r raised %s; closing the worker, then raising it",
                    hook,
                    type(exc).__name__,
                )
                raised = exc
                break
        if self._publisher is not None:
            self.app.unbind(self._publisher)
        await self._close_owned()
        await self.observer.aclose()
        await self.endpoints.aclose()
        self._stopped.set()
        log.info("worker stopped: %s", self.stats.as_dict())
        if raised is not None:
            raise raised

    async def _drain(self, pending: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
        """Wait for ``pending`` until the deadline, which a later ``stop()`` may bring in."""
        assert self._hurry is not None
        loop = asyncio.get_running_loop()
        while pending:
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                break
            self._hurry.clear()
            hurry = asyncio.create_task(self._hurry.wait())
            timeout = None if remaining == math.inf else remaining
            try:
                done, _ = await asyncio.wait(
                    {*pending, hurry}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                hurry.cancel()
            pending -= done
        return pending

    async def _close_owned(self) -> None:
        # A third-party driver may raise anything on close: were it to escape, the resources
        # after it would stay open and stop() would never mark the worker stopped, so
        # wait_stopped() (and `oncely run`) would hang.
        for resource in reversed(self._owned):
            try:
                await resource.aclose()
            except OncelyError as exc:
                log.warning("closing %s failed: %s", type(resource).__name__, exc)
            except Exception:
                log.exception("closing %s failed unexpectedly", type(resource).__name__)
        self._owned.clear()
