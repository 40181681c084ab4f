"""How one delivery is run and settled: the careful part of the worker.

Order matters everywhere here:
- the completion is recorded in the store *before* the ack, so a crash between the two leaves
  a redelivery that finds ``COMPLETED`` and is acked without running;
- a lease is released *before* the nack, so the redelivery can take the key at once;
- a cancelled handler (shutdown) is released and nacked with no delay, shielded from the
  cancellation itself, so nothing is acked that did not finish.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely.errors import (
    BrokerError,
    DecodeError,
    HandlerTimeout,
    LeaseLost,
    Reject,
    Retry,
    StoreError,
)
from oncely.runtime.codec import encode, fingerprint
from oncely.runtime.context import Context
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from oncely.stores.base import Outcome, StoreTransaction, TransactionalStore

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from oncely.brokers.base import Broker, Delivery
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.publisher import Publisher
    from oncely.stores.base import IdempotencyStore

log = logging.getLogger("oncely.worker")

IN_PROGRESS_DELAY_CAP = 5.0
"""The longest a message waits before re-checking a key another worker holds."""


@dataclass(slots=True)
class Lease:
    key: str
    token: str


class Runner:
    """Runs deliveries of one handler. One instance per handler per worker."""

    def __init__(
        self,
        spec: HandlerSpec,
        broker: Broker,
        store: IdempotencyStore | None,
        publisher: Publisher,
        stats: Stats,
        *,
        fail_open: bool,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.store = store
        self.publisher = publisher
        self.stats = stats
        self.fail_open = fail_open
        self.heartbeat = Heartbeat(
            spec.name,
            spec.visibility,
            extend=broker.capabilities.extend,
            store=None if spec.transactional else store,
        )

    async def aclose(self) -> None:
        """Stop the heartbeat; call once no delivery of this handler runs any more."""
        await self.heartbeat.aclose()

    async def run(self, delivery: Delivery) -> None:
        """Run the handler on ``delivery`` and settle it. Never raises except on cancel."""
        self.stats.received += 1
        try:
            payload = self.spec.decoder.decode(delivery.body)
        except DecodeError as exc:
            # Decoding has no side effects, so even an at-most-once poison message can go to
            # the dead-letter queue rather than vanish.
            await self._dead_letter(delivery, f"undecodable payload: {exc}")
            return
        if self.spec.guarantee == "at_most_once":
            await self._at_most_once(delivery, payload)
            return
        lease: Lease | None = None
        key: str | None = None
        if self.spec.uses_store:
            try:
                key = self.spec.key.extract(payload, delivery)
            except Exception as exc:
                # A key function that fails on this payload will fail on every redelivery.
                await self._dead_letter(delivery, f"key extraction failed: {exc!r}")
                return
            if key is None and self.spec.on_missing_key == "reject":
                await self._dead_letter(delivery, "message has no idempotency key")
                return
            if key is not None:
                started, lease = await self._begin(delivery, key)
                if not started:
                    return
        await self._execute(delivery, payload, key, lease)

    async def _at_most_once(self, delivery: Delivery, payload: Any) -> None:
        # Acked before the handler runs: a crash or failure from here on loses the message,
        # which is the contract the handler asked for.
        if not await self._settle(delivery.ack(), delivery, "ack"):
            return
        try:
            await self._call(delivery, payload, None, None)
        except Exception as exc:
            self.stats.failed += 1
            log.warning("%s: at-most-once message %s failed: %r", self.spec.name, delivery.id, exc)
        else:
            self.stats.processed += 1

    async def _begin(self, delivery: Delivery, key: str) -> tuple[bool, Lease | None]:
        """Claim ``key``; return whether to run the handler, and the lease if one was taken."""
        assert self.store is not None
        store_key = f"{self.spec.name}:{key}"
        try:
            begin = await self.store.begin(
                store_key, fingerprint(delivery.body), self.spec.visibility
            )
        except StoreError as exc:
            if self.fail_open and not self.spec.transactional:
                log.warning(
                    "%s: store unreachable, running %s WITHOUT dedupe (fail_open): %s",
                    self.spec.name,
                    delivery.id,
                    exc,
                )
                return True, None
            log.warning("%s: store unreachable, retrying %s later: %s", self.spec.name, key, exc)
            self.stats.deferred += 1
            await self._nack(delivery, self.spec.retry.delay(delivery.attempt))
            return False, None
        if begin.outcome is Outcome.NEW:
            assert begin.token is not None
            return True, Lease(store_key, begin.token)
        if begin.outcome is Outcome.COMPLETED:
            self.stats.duplicates += 1
            await self._settle(delivery.ack(), delivery, "ack")
        elif begin.outcome is Outcome.IN_PROGRESS:
            self.stats.deferred += 1
            await self._nack(delivery, min(max(begin.retry_after, 0.05), IN_PROGRESS_DELAY_CAP))
        else:
            await self._dead_letter(
                delivery, f"idempotency key {key!r} was reused with a different payload"
            )
        return False, None

    async def _execute(
        self, delivery: Delivery, payload: Any, key: str | None, lease: Lease | None
    ) -> None:
        try:
            result = await self._call(delivery, payload, key, lease)
        except asyncio.CancelledError:
            await asyncio.shield(self._give_back(delivery, lease))
            raise
        except Reject as exc:
            await self._release(lease)
            await self._dead_letter(delivery, exc.reason)
        except Retry as exc:
            await self._release(lease)
            delay = exc.delay if exc.delay is not None else self.spec.retry.delay(delivery.attempt)
            await self._failed(delivery, f"Retry: {exc.reason}", delay)
        except Exception as exc:
            await self._release(lease)
            log.info(
                "%s: %s failed on attempt %d: %r",
                self.spec.name,
                delivery.id,
                delivery.attempt,
                exc,
            )
            reason = f"{type(exc).__name__}: {exc}"
            await self._failed(delivery, reason, self.spec.retry.delay(delivery.attempt))
        else:
            if lease is not None and not self.spec.transactional:
                assert self.store is not None
                try:
                    await self.store.complete(lease.key, lease.token, result, self.spec.result_ttl)
                except LeaseLost:
                    # The effect happened but another worker owns the key now and may run it
                    # again: the plain store's crash window, made visible.
                    log.error("%s: lease on %s lost before completion", self.spec.name, key)
                except StoreError as exc:
                    log.error("%s: could not record completion of %s: %s", self.spec.name, key, exc)
            if await self._settle(delivery.ack(), delivery, "ack"):
                self.stats.processed += 1

    async def _call(
        self, delivery: Delivery, payload: Any, key: str | None, lease: Lease | None
    ) -> bytes | None:
        """Run the handler under its timeout and heartbeat; return the encoded result."""
        spec = self.spec
        tx_cm: AbstractAsyncContextManager[StoreTransaction | None] = nullcontext()
        active = Active(delivery, asyncio.current_task())
        if lease is not None:
            if spec.transactional:
                assert isinstance(self.store, TransactionalStore)
                tx_cm = self.store.transaction(lease.key, lease.token, spec.result_ttl)
            else:
                active.lease_key, active.lease_token = lease.key, lease.token
        self.heartbeat.track(active)
        # A bare timer rather than asyncio.timeout(): same effect, a fraction of the cost.
        timer = asyncio.get_running_loop().call_later(spec.timeout, active.expire)
        try:
            async with tx_cm as tx:
                if spec.wants_context:
                    value = await spec.fn(payload, Context(delivery, key, self.publisher, tx))
                else:
                    value = await spec.fn(payload)
                result = self._encode_result(value)
                if tx is not None:
                    tx.result = result
            return result
        except asyncio.CancelledError:
            if not (active.timed_out or active.lease_lost) or active.task is None:
                raise
            active.task.uncancel()
            if active.timed_out:
                raise HandlerTimeout(f"handler ran past its {spec.timeout}s timeout") from None
            raise LeaseLost(f"lease on {key!r} was taken over while the handler ran") from None
        finally:
            timer.cancel()
            self.heartbeat.untrack(active)

    def _encode_result(self, value: object) -> bytes | None:
        if value is None:
            return None
        try:
            return encode(value)
        except TypeError as exc:
            # The effect already happened: a return value that cannot be cached must not turn
            # a success into a retry (which would run the effect again).
            log.error("%s: result not cached, cannot encode it: %s", self.spec.name, exc)
            return None

    async def _failed(self, delivery: Delivery, reason: str, delay: float) -> None:
        if self.spec.retry.exhausted(delivery.attempt):
            await self._dead_letter(
                delivery, f"{reason} (gave up after {delivery.attempt} attempts)"
            )
        else:
            self.stats.retried += 1
            await self._nack(delivery, delay)

    async def _give_back(self, delivery: Delivery, lease: Lease | None) -> None:
        self.stats.cancelled += 1
        await self._release(lease)
        await self._nack(delivery, 0.0)

    async def _release(self, lease: Lease | None) -> None:
        if lease is None or self.store is None:
            return
        try:
            await self.store.release(lease.key, lease.token)
        except StoreError as exc:
            log.warning(
                "%s: could not release %s (it will expire): %s", self.spec.name, lease.key, exc
            )

    async def _nack(self, delivery: Delivery, delay: float) -> None:
        await self._settle(delivery.nack(delay), delivery, "nack")

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        log.warning("%s: dead-lettering %s: %s", self.spec.name, delivery.id, reason)
        if await self._settle(delivery.reject(reason), delivery, "reject"):
            self.stats.dead_lettered += 1

    async def _settle(self, op: Awaitable[None], delivery: Delivery, verb: str) -> bool:
        """Await a settle operation; a broker error is logged, never raised: the broker
        redelivers what was not settled, and the store absorbs the duplicate."""
        try:
            await op
        except BrokerError as exc:
            self.stats.settle_errors += 1
            log.warning("%s: %s of %s failed: %r", self.spec.name, verb, delivery.id, exc)
            return False
        return True
