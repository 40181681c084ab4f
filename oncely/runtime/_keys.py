"""The idempotency side of one effectively-once handler: begin, wait, complete, release.

- A duplicate whose key is held **by this same handler in this process** waits on an
  in-process event for that key (at most ``LOCAL_WAIT_CAP``, and never past the holder's
  lease), then begins again: it is answered as soon as the holder completes or releases,
  not after a fixed delay. Only until the key is first deferred: the wait holds a
  concurrency slot, and were every redelivery to wait again, the duplicates of a
  long-running holder would keep the slots from every other message while it runs.
- A duplicate whose key another process holds is deferred (``nack(defer=True)``) with a
  delay that starts at ``FIRST_RECHECK`` and doubles per deferral of that key, bounded by the
  holder's remaining lease.
- A completion that fails to record is retried with a short backoff while the lease is
  surely still valid (a third of ``visibility``), then logged at ERROR as the crash window it
  is. The message is acked all the same: the effect happened, and a nack would guarantee the
  effect runs again, while an ack leaves only the chance of a broker redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

from oncely.errors import LeaseLost
from oncely.stores.base import Outcome

if TYPE_CHECKING:
    from oncely.runtime.stats import Stats
    from oncely.stores.base import Begin, IdempotencyStore

log = logging.getLogger("oncely.worker")

FIRST_RECHECK = 0.05
"""Seconds before a key held elsewhere is first checked again."""

LOCAL_WAIT_CAP = 5.0
"""The longest a duplicate waits in-process (holding a concurrency slot) for a local holder."""

COMPLETE_TRIES = 5
"""How many times a completion is attempted before it is given up as the crash window."""

# Module constants: on Python 3.11 reading an enum member off its class runs the enum
# metaclass's attribute hook, ~1 k instructions a read.
NEW, IN_PROGRESS = Outcome.NEW, Outcome.IN_PROGRESS

_REMEMBERED = 10_000
"""Keys whose deferral count is remembered, to grow their recheck delay; oldest forgotten."""


@dataclass(slots=True)
class Lease:
    key: str
    token: str


class Keys:
    """Dedupe bookkeeping for one handler in one worker.

    Args:
        name: the handler name, for logs.
        store: the idempotency store.
        stats: the worker's counters.
        visibility: the lease length, in seconds.
    """

    def __init__(
        self, name: str, store: IdempotencyStore, stats: Stats, *, visibility: float
    ) -> None:
        self.name = name
        self.store = store
        self.stats = stats
        self.visibility = visibility
        # The keys this handler holds here, each with the event its local duplicates wait
        # on: made by the first of them, so a key nobody waits for costs no event.
        self._held: dict[str, asyncio.Event | None] = {}
        self._deferrals: OrderedDict[str, int] = OrderedDict()
        self.held = self._held
        self.deferred = self._deferrals
        """The same two, read-only, for the runner's inlined copies of ``begun`` and
        ``finished`` (a call less each per message)."""

    async def begin(self, key: str, fingerprint: str) -> Begin:
        """``store.begin``, waiting for a local holder of ``key`` to finish first.

        Raises:
            Exception: whatever the store raised; the caller fails closed (or open).
        """
        if self.stats.store_seconds is None:
            begun = await self.store.begin(key, fingerprint, self.visibility)
        else:
            begun = await self.timed_begin(key, fingerprint)
        if begun.outcome is IN_PROGRESS:
            return await self.in_progress(key, fingerprint, begun)
        self.begun(key, begun)
        return begun

    async def in_progress(self, key: str, fingerprint: str, begun: Begin) -> Begin:
        """The rest of ``begin`` after ``store.begin`` found ``key`` in progress: wait for a
        local holder (see the module docstring), then as ``begun``."""
        if key in self._held and key not in self._deferrals:
            begun = await self._after_local_holder(key, fingerprint, begun)
            if begun.outcome is not IN_PROGRESS:
                self.begun(key, begun)
        return begun

    def begun(self, key: str, begun: Begin) -> None:
        """The rest of ``begin`` after ``store.begin`` answered ``begun``, not in progress:
        a lease taken is held here, and the key's deferrals are forgotten.

        Split out so the runner can await ``store.begin`` itself (a coroutine layer less per
        message) and call this, as ``begin`` does."""
        if begun.outcome is NEW:
            held = self._held
            if key in held:  # a lease of ours expired and was taken over: re-check
                stale = held[key]
                if stale is not None:
                    stale.set()
            held[key] = None
        if self._deferrals:
            self._deferrals.pop(key, None)

    async def _after_local_holder(self, key: str, fingerprint: str, begun: Begin) -> Begin:
        """Wait (at most ``LOCAL_WAIT_CAP``) for the local holder of ``key``, and begin again
        each time it lets go, until the outcome is not a local hold any more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCAL_WAIT_CAP
        while True:
            held = self._held
            if begun.outcome is not IN_PROGRESS or key not in held:
                return begun
            if key in self._deferrals:  # deferred meanwhile: no second wait for this key
                return begun
            wait = min(max(begun.retry_after, FIRST_RECHECK), deadline - loop.time())
            if wait <= 0:
                return begun
            event = held[key]
            if event is None:
                event = held[key] = asyncio.Event()
            try:
                await asyncio.wait_for(event.wait(), wait)
            except TimeoutError:
                return begun
            begun = await self.timed_begin(key, fingerprint)

    async def timed_begin(self, key: str, fingerprint: str) -> Begin:
        """``store.begin``, its latency observed (failures too) when timings are on."""
        timing = self.stats.store_seconds
        if timing is None:
            return await self.store.begin(key, fingerprint, self.visibility)
        started = perf_counter()
        try:
            return await self.store.begin(key, fingerprint, self.visibility)
        finally:
            timing.observe(perf_counter() - started)

    def finished(self, key: str) -> None:
        """The holder of ``key`` completed or released it: wake local duplicates."""
        event = self._held.pop(key, None)
        if event is not None:
            event.set()

    def recheck_delay(self, key: str, retry_after: float) -> float:
        """How long to defer a duplicate of ``key``, held elsewhere for ``retry_after`` more
        seconds: ``FIRST_RECHECK``, doubling per deferral, at most ``retry_after``."""
        n = self._deferrals.pop(key, 0)
        self._deferrals[key] = n + 1
        if len(self._deferrals) > _REMEMBERED:
            self._deferrals.popitem(last=False)
        # Bounded exponent: a key held for hours is deferred past n = 1024, where 2.0**n
        # overflows; 2**32 rechecks already dwarf any lease.
        return min(FIRST_RECHECK * 2.0 ** min(n, 32), max(retry_after, FIRST_RECHECK))

    def deferrals(self, key: str) -> int:
        """How many times ``key`` was deferred (store down) in a row; counts this one."""
        n = self._deferrals.pop(key, 0) + 1
        self._deferrals[key] = n
        if len(self._deferrals) > _REMEMBERED:
            self._deferrals.popitem(last=False)
        return n

    async def complete(self, lease: Lease, result: bytes | None, ttl: float) -> None:
        """Record completion, retrying a failing store while the lease surely holds."""
        # The heartbeat renewed the lease at most a third of visibility ago. (The monotonic
        # clock, not loop.time(): the same elapsed time, at a fraction of the cost.)
        since = time.monotonic()
        try:
            if self.stats.store_seconds is None:
                # The first try inline: nearly every completion is recorded by it.
                try:
                    await self.store.complete(lease.key, lease.token, result, ttl)
                except Exception as exc:
                    await self.complete_retrying(lease, result, ttl, since, exc)
            else:
                await self.complete_retrying(lease, result, ttl, since, None)
        finally:
            event = self._held.pop(lease.key, None)  # self.finished(), inlined
            if event is not None:
                event.set()

    async def complete_retrying(
        self,
        lease: Lease,
        result: bytes | None,
        ttl: float,
        since: float,
        failure: Exception | None,
    ) -> None:
        """The tries of ``complete`` begun at ``since``; ``failure`` is the first one's error
        if it was made already."""
        deadline = since + self.visibility / 3
        pause = 0.05
        timing = self.stats.store_seconds
        tries = 0 if failure is None else 1
        while True:
            if failure is None:
                tries += 1
                started = perf_counter() if timing is not None else 0.0
                try:
                    await self.store.complete(lease.key, lease.token, result, ttl)
                    return
                except Exception as exc:
                    failure = exc
                finally:
                    if timing is not None:
                        timing.observe(perf_counter() - started)
            if isinstance(failure, LeaseLost):
                # Another worker owns the key now and may run it again.
                self.stats.unrecorded += 1
                log.error(
                    "%s: lease on %s lost before completion was recorded; the effect may "
                    "run again (crash window)",
                    self.name,
                    lease.key,
                )
                return
            self.stats.store_errors += 1
            if tries >= COMPLETE_TRIES or time.monotonic() + pause > deadline:
                self.stats.unrecorded += 1
                log.error(
                    "%s: completion of %s could not be recorded after %d tries, acking "
                    "anyway (crash window: a redelivery would run the effect again): %r",
                    self.name,
                    lease.key,
                    tries,
                    failure,
                )
                return
            self.stats.complete_retries += 1
            log.warning(
                "%s: recording completion of %s failed, retrying in %.2fs: %r",
                self.name,
                lease.key,
                pause,
                failure,
            )
            await asyncio.sleep(pause)
            pause *= 2
            failure = None

    async def release(self, lease: Lease | None) -> None:
        """Give a lease back so a retry can take the key at once; a failure lets it expire."""
        if lease is None:
            return
        try:
            await self.store.release(lease.key, lease.token)
        except Exception as exc:
            self.stats.store_errors += 1
            log.warning("%s: could not release %s (it will expire): %r", self.name, lease.key, exc)
        finally:
            self.finished(lease.key)
