"""One handler's consume loop, supervised; the policy is in ``oncely.runtime.worker``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from oncely.errors import BrokerError, ConfigError, NotSupported

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


class ConsumeLoop:
    """Fetches deliveries of one handler's topic while slots are free, and hands them on.

    Args:
        broker: the connected broker.
        runner: the handler's runner.
        stopping: set when the worker stops; the loop then ends.
        stats: the worker's counters.
        spawn: starts a task running one delivery; it releases the slot when done.
        fail: stops the worker loudly with a cause (the loop returns right after).
    """

    def __init__(
        self,
        broker: Broker,
        runner: Runner,
        stopping: asyncio.Event,
        stats: Stats,
        *,
        spawn: Callable[[Runner, Delivery, asyncio.Semaphore], None],
        fail: Callable[[str, BaseException], None],
    ) -> None:
        self.broker = broker
        self.runner = runner
        self.stopping = stopping
        self.stats = stats
        self.spawn = spawn
        self.fail = fail

    async def run(self) -> None:
        runner = self.runner
        spec = runner.spec
        # Without per-message extend, the broker's own redelivery timer must outlast the
        # handler, because no heartbeat can push it out.
        visibility = spec.visibility
        if not self.broker.capabilities.extend:
            visibility = max(visibility, spec.timeout * 1.5 + 5)
        slots = asyncio.Semaphore(spec.concurrency)
        pause = RESUBSCRIBE_DELAY[0]
        unexpected = 0
        while not self.stopping.is_set():
            sub: Subscription | None = None
            try:
                sub = self.broker.consume(
                    spec.topic, prefetch=spec.concurrency, visibility=visibility
                )
                while True:
                    await slots.acquire()
                    try:
                        delivery = await sub.__anext__()
                    except BaseException:
                        slots.release()
                        raise
                    pause, unexpected = RESUBSCRIBE_DELAY[0], 0
                    self.spawn(runner, delivery, slots)
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
                log.error(
                    "%s: consuming %s failed, resubscribing in %.1fs: %s",
                    spec.name,
                    spec.topic,
                    pause,
                    exc,
                )
            except Exception as exc:
                self.stats.consume_errors += 1
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
                if sub is not None:
                    await asyncio.shield(_close_sub(sub))
            try:
                await asyncio.wait_for(self.stopping.wait(), pause)
            except TimeoutError:
                pause = min(pause * 2, RESUBSCRIBE_DELAY[1])


async def _close_sub(sub: Subscription) -> None:
    try:
        await sub.aclose()
    except Exception as exc:
        log.warning("closing a subscription failed: %r", exc)
