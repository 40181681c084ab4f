"""Settling a delivery without ever letting the attempt escape: ack, nack, reject.

A settle operation that fails is logged and counted, never raised: the broker redelivers what
was not settled (after its visibility runs out), and the idempotency store absorbs the
duplicate. Third-party adapters may raise anything, so anything is caught; oncely's own
``BrokerError`` is the expected case and is logged without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from oncely.brokers.base import REASON_LIMIT, clip_error
from oncely.errors import BrokerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from oncely.brokers.base import Capabilities, Delivery
    from oncely.runtime.stats import Stats

TAIL = 100
"""Characters of a long reason's end kept by the clip (``(gave up after N attempts)``)."""

log = logging.getLogger("oncely.worker")


class Settler:
    """Settles deliveries of one handler and keeps its counters.

    Args:
        name: the handler name, for logs.
        capabilities: the broker's; ``max_delay`` bounds every nack delay.
        stats: the worker's counters.
    """

    __slots__ = ("carries_errors", "max_delay", "name", "stats")

    def __init__(self, name: str, capabilities: Capabilities, stats: Stats) -> None:
        self.name = name
        self.max_delay = capabilities.max_delay
        self.carries_errors = capabilities.carries_errors
        self.stats = stats

    async def ack(self, delivery: Delivery) -> bool:
        # Inlined _settle: one coroutine frame less on every message's path. (Runner.run and
        # Runner._succeeded inline this in turn without tracing: keep the three alike.)
        try:
            await delivery.ack()
        except Exception:
            self.ack_failed(delivery)
            return False
        self.stats.acked += 1
        return True

    def ack_failed(self, delivery: Delivery) -> None:
        """Count and log the failed ack being handled (call from an ``except`` block)."""
        self._failed(delivery, "ack")

    async def nack(
        self, delivery: Delivery, delay: float, *, defer: bool = False, error: str | None = None
    ) -> bool:
        """Nack with ``delay`` clamped to the broker's ``max_delay``.

        A retry policy (or a ``Retry(delay=)``) may ask for more than a broker can hold, as
        ``RetryPolicy(cap=7200)`` does on RabbitMQ (1 hour): the message then comes back after
        the longest delay the broker has, rather than the nack failing on every attempt.
        ``defer=True`` marks a deferral: the handler did not run, so the attempt is kept where
        the broker can (``Capabilities.defer_keeps_attempt``). ``error`` (the failure) is
        passed on only to brokers that carry it (``Capabilities.carries_errors``). ``True``
        if the broker took the nack and the message comes back; ``False`` if the nack failed
        (logged and counted) or the broker dead-lettered the message instead.
        """
        if self.max_delay is not None and delay > self.max_delay:
            log.info(
                "%s: delay %.1fs for %s is over the broker's max_delay; clamped to %.1fs",
                self.name,
                delay,
                delivery.id,
                self.max_delay,
            )
            self.stats.delays_clamped += 1
            delay = self.max_delay
        delay = max(delay, 0.0)
        try:
            if error is not None and self.carries_errors:
                kept = await delivery.nack(delay, defer=defer, error=error)
            else:
                kept = await delivery.nack(delay, defer=defer)
        except Exception:
            self._failed(delivery, "nack")
            return False
        if kept is False:
            self.dead_lettered_instead(delivery)
            return False
        self.stats.nacked += 1
        return True

    def dead_lettered_instead(self, delivery: Delivery) -> None:
        """The broker settled a nack of ``delivery`` by dead-lettering it (``Delivery.nack``
        returned ``False``; the broker logged why): a dead letter, not a retry, a deferral or
        a give-back, so ``nack`` returns ``False`` and none of those is counted."""
        self.stats.dead_lettered += 1

    async def dead_letter(
        self, delivery: Delivery, reason: str, *, logged: str | None = None
    ) -> bool:
        """Reject with ``reason``; the log line says ``logged`` instead when given (a reason
        that quotes the payload, which logs never show)."""
        # Clipped in the middle: the end says how many attempts were made.
        reason = clip_error(reason, REASON_LIMIT, tail=TAIL)
        shown = reason if logged is None else clip_error(logged, REASON_LIMIT, tail=TAIL)
        log.warning("%s: dead-lettering %s: %s", self.name, delivery.id, shown)
        if await self._settle(lambda: delivery.reject(reason), delivery, "reject"):
            self.stats.dead_lettered += 1
            return True
        return False

    async def _settle(
        self, op: Callable[[], Awaitable[None]], delivery: Delivery, verb: str
    ) -> bool:
        try:
            await op()
        except Exception:
            self._failed(delivery, verb)
            return False
        return True

    def _failed(self, delivery: Delivery, verb: str) -> None:
        """Count and log the exception being handled (call from an ``except`` block)."""
        self.stats.settle_errors += 1
        exc = sys.exc_info()[1]
        if isinstance(exc, BrokerError):
            log.warning("%s: %s of %s failed: %r", self.name, verb, delivery.id, exc)
        else:
            # A third-party adapter's own bug: the traceback is the only way to find it.
            log.exception("%s: %s of %s failed unexpectedly", self.name, verb, delivery.id)


def is_settled(delivery: Delivery) -> bool:
    """``delivery.settled``, reading a broken adapter's property as "not settled"."""
    try:
        return bool(delivery.settled)
    except Exception:
        return False
