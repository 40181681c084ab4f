"""How a ``Runner`` settles a delivery that did not end in a success under a lease.

The runner's own module keeps the path every message takes (decode, key, claim, handler,
record, ack); these are the other outcomes, kept apart so that path reads straight:
- ``store.begin`` failed: defer the delivery (fail closed), or run it without dedupe
  (``fail_open``);
- the key was not new: a duplicate of a completed key (acked, or answered by
  ``on_duplicate``), a key held elsewhere (deferred), a key reused with another payload
  (dead-lettered);
- the handler raised: ``Reject`` dead-letters, ``Retry`` and other errors retry until the
  attempts run out, a store outage in a transaction or a lost lease defers;
- the handler was cancelled (shutdown): the lease is released and the delivery given back.

Every settle here is run whole (``Finisher``, ``oncely.runtime._finish``), not just those of
a run that is over: a shutdown cancel that lands while a dead-letter or a deferral's nack is
on its way must not add a give-back on top of it. The broker's step goes on without its caller
(SQLite's ``COMMIT`` runs on the connection's thread, a broker's publish to its dead-letter
queue is in flight), so the delivery still reads unsettled, and the give-back either fails
against a message that is gone (a settle error, the dead letter uncounted) or, on a broker
whose reject is two steps, puts the message back while its dead-letter copy is written.

``FailurePaths`` is a base class of ``Runner``, not an object it calls: the methods are found
on the runner's type as before, so no call layer or attribute read is added anywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from oncely.errors import (
    DecodeError,
    HandlerTimeout,
    LeaseLost,
    Reject,
    Retry,
    StoreError,
    StoreUnavailable,
)
from oncely.runtime._invoke import Escaped, raised, stop_if_asked
from oncely.runtime.context import Context
from oncely.runtime.heartbeat import Active
from oncely.stores.base import Outcome

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime._finish import Finisher
    from oncely.runtime._keys import Keys, Lease
    from oncely.runtime._settle import Settler
    from oncely.runtime._tracing import Tracing
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.codec import Decoder
    from oncely.runtime.heartbeat import Heartbeat
    from oncely.runtime.publisher import Publisher
    from oncely.runtime.stats import Stats
    from oncely.stores.base import Begin

log = logging.getLogger("oncely.worker")

# Module constants, as in the runner: reading an enum member off its class costs ~1 k.
IN_PROGRESS, COMPLETED = Outcome.IN_PROGRESS, Outcome.COMPLETED


class FailurePaths:
    """The settles of a ``Runner`` other than a success; it sets these attributes."""

    spec: HandlerSpec
    stats: Stats
    settle: Settler
    tracing: Tracing | None
    keys: Keys | None
    heartbeat: Heartbeat
    publisher: Publisher
    fail_open: bool
    _results: Decoder
    _finish: Finisher

    async def _begin_failed(
        self, delivery: Delivery, key: str, store_key: str, exc: Exception
    ) -> bool:
        """``store.begin`` raised ``exc``: fail closed (defer the delivery), or open if so
        configured. Return whether to run the handler anyway (without a lease)."""
        # Any store failure, a third-party store's RuntimeError included, fails closed.
        self.stats.store_errors += 1
        if not isinstance(exc, StoreError):
            log.exception("%s: store.begin failed unexpectedly", self.spec.name)
        if self.fail_open and not self.spec.transactional:
            self.stats.fail_open += 1
            log.warning(
                "%s: store unreachable, running %s WITHOUT dedupe (fail_open): %r",
                self.spec.name,
                delivery.id,
                exc,
            )
            return True
        log.warning("%s: store unreachable, retrying %s later: %r", self.spec.name, key, exc)
        assert self.keys is not None
        delay = self.spec.retry.delay(self.keys.deferrals(store_key))
        await self._finish(self._defer(delivery, delay), delivery)
        return False

    async def _not_new(self, delivery: Delivery, key: str, store_key: str, begin: Begin) -> None:
        """Settle a delivery whose key ``store.begin`` did not give this worker: a duplicate
        of a completed key, a key held elsewhere, or a key reused with another payload."""
        outcome = begin.outcome
        if outcome is COMPLETED:
            await self._duplicate(delivery, key, begin)
        elif outcome is IN_PROGRESS:
            assert self.keys is not None
            delay = self.keys.recheck_delay(store_key, begin.retry_after)
            await self._finish(self._defer(delivery, delay, in_progress=True), delivery)
        else:
            await self._dead_letter(
                delivery, f"idempotency key {key!r} was reused with a different payload"
            )

    async def _duplicate(self, delivery: Delivery, key: str, begin: Begin) -> None:
        hook = self.spec.on_duplicate
        if hook is not None:
            # The hook is user code like the handler, so the handler's timeout and heartbeat
            # apply: a hook that never returns would otherwise hold its slot for good, and
            # its redeliveries the others.
            active = Active(delivery, asyncio.current_task())
            self.heartbeat.track(active)
            deadline = asyncio.timeout(self.spec.timeout)
            try:
                result = None if begin.result is None else self._results.decode(begin.result)
                async with deadline:
                    await hook(result, Context(delivery, key, self.publisher))
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                    raise
                error = exc if isinstance(exc, Exception) else Escaped(exc)
                if deadline.expired():
                    error = HandlerTimeout(f"ran past its {self.spec.timeout}s timeout")
                elif active.task is not None and active.task.cancelling():
                    # A shutdown's cancel the hook turned into an error of its own (see
                    # Invoke): given back, not a failure.
                    raise asyncio.CancelledError from exc
                log.info("%s: on_duplicate failed for %s: %r", self.spec.name, delivery.id, error)
                # As for the handler: Reject dead-letters at once (retrying would run the hook,
                # and whatever it sends, again), and Retry's own delay wins.
                settling = self._settle_failure(delivery, error, "on_duplicate: ")
                await self._finish(settling, delivery)
                stop_if_asked(error)
                return
            finally:
                self.heartbeat.untrack(active)
        await self._finish(self._ack_duplicate(delivery), delivery)

    async def _ack_duplicate(self, delivery: Delivery) -> None:
        if await self.settle.ack(delivery):
            self.stats.duplicates += 1

    async def _ran_and_failed(
        self, delivery: Delivery, lease: Lease | None, exc: Exception
    ) -> None:
        if self.tracing is not None:
            self.tracing.failed(delivery, raised(exc))
        await self._release(lease)
        if self.spec.transactional and isinstance(exc, StoreUnavailable) and self.keys is not None:
            # The store failed around the handler (its own errors propagate unchanged):
            # nothing committed, or a COMMIT whose reply was lost did and the redelivery finds
            # the key completed. A deferral, as when begin finds the store down: it spends no
            # attempt, so a store outage never dead-letters a message.
            self.stats.store_errors += 1
            log.warning(
                "%s: store failed in the transaction, retrying later: %r", self.spec.name, exc
            )
            assert lease is not None
            await self._defer(delivery, self.spec.retry.delay(self.keys.deferrals(lease.key)))
        elif isinstance(exc, LeaseLost) and lease is not None and self.keys is not None:
            # Another worker took the key over (the heartbeat found the lease gone and
            # cancelled the handler, or the transaction's completion was refused): the key is
            # its work now, not this copy's failure. Deferred, spending no attempt, so the copy
            # comes back to find the key in progress or completed, never dead-lettered for it.
            log.warning("%s: %s lost its lease, deferring: %s", self.spec.name, delivery.id, exc)
            await self._defer(delivery, self.keys.recheck_delay(lease.key, self.keys.visibility))
        else:
            if not isinstance(exc, Reject | Retry):
                log.info(
                    "%s: %s failed on attempt %d: %r",
                    self.spec.name,
                    delivery.id,
                    delivery.attempt,
                    exc,
                )
            await self._settle_failure(delivery, exc)

    async def _settle_failure(self, delivery: Delivery, exc: Exception, prefix: str = "") -> None:
        """Settle a run of user code (the handler, or ``on_duplicate`` with its ``prefix``) that
        raised ``exc``: ``Reject`` dead-letters at once, ``Retry`` retries after its own delay
        if it gives one, anything else is a failure retried with the policy's backoff."""
        if isinstance(exc, Reject):
            self.stats.rejected += 1
            await self.settle.dead_letter(delivery, exc.reason)
            return
        if isinstance(exc, Retry):
            delay = exc.delay if exc.delay is not None else self.spec.retry.delay(delivery.attempt)
            reason = f"{prefix}Retry: {exc.reason}"
        else:
            delay = self.spec.retry.delay(delivery.attempt)
            reason = prefix + describe(exc)
        await self._failed(delivery, reason, delay)

    async def _failed(self, delivery: Delivery, reason: str, delay: float) -> None:
        if self.spec.retry.exhausted(delivery.attempt):
            await self.settle.dead_letter(
                delivery, f"{reason} (gave up after {delivery.attempt} attempts)"
            )
        elif await self.settle.nack(delivery, delay, error=reason):
            self.stats.retried += 1

    async def _dead_letter(
        self, delivery: Delivery, reason: str, *, logged: str | None = None
    ) -> None:
        """Dead-letter ``delivery`` whole: a cancel meanwhile lets it finish (see the module
        docstring). For a run's own settle, not one already inside a ``Finisher``."""
        await self._finish(self.settle.dead_letter(delivery, reason, logged=logged), delivery)

    async def _defer(self, delivery: Delivery, delay: float, *, in_progress: bool = False) -> None:
        """Nack ``delivery`` as a deferral (the attempt kept) after ``delay``; counted once the
        broker took it: a failed nack comes back and counts then."""
        if await self.settle.nack(delivery, delay, defer=True):
            self.stats.deferred += 1
            if in_progress:
                self.stats.in_progress += 1

    async def _give_back(self, delivery: Delivery, lease: Lease | None) -> None:
        await self._release(lease)
        if await self.settle.nack(delivery, 0.0, defer=True):
            self.stats.cancelled += 1

    async def _release(self, lease: Lease | None) -> None:
        if self.keys is not None:
            await self.keys.release(lease)


def describe(exc: BaseException) -> str:
    """``"Type: message"`` for a dead-letter reason. Never raises: a user exception whose
    ``__str__`` fails would otherwise turn every failure of its handler into an internal error
    (nacked, never dead-lettered), and the handler would run again and again."""
    exc = raised(exc) if isinstance(exc, Exception) else exc
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    if isinstance(exc, DecodeError):
        return text
    return f"{type(exc).__name__}: {text}"
