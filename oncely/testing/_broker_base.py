"""What every part of the broker conformance suite shares: the features record, the
fixtures that open brokers, and the helpers that wait for deliveries with a bound."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import anyio
import anyio.lowlevel
import pytest

from oncely.brokers.base import DeadLetter, DeadLetterAdmin

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery, Subscription

__all__ = ["BrokerCases", "BrokerFactory", "BrokerFeatures"]

BrokerFactory = Callable[[], Awaitable["Broker"]]
"""Returns a new connected broker on the location of the current test."""

EARLY = 0.01
"""How early a deadline may appear to pass: the broker's clock and the test's are read at
slightly different moments. Anything earlier than this is a real bug."""


@dataclass(frozen=True, slots=True)
class BrokerFeatures:
    """Which cases apply to a broker, and the timings it honours.

    Attributes:
        delay: ``publish(delay=)`` and ``nack(delay=)`` hold a message back.
        delay_granularity: how far the broker may round a delay up (AMQP delay buckets).
        extend: ``Delivery.extend`` works; when false the suite checks it raises
            ``NotSupported``.
        visibility_expiry: an unsettled delivery comes back once ``visibility`` passes.
        lease_check: settling a delivery whose lease was lost raises ``DeliveryExpired``
            (SQS may accept a stale receipt handle silently).
        dlq: ``reject`` puts the message where ``read_dead_letters`` can see it.
        dlq_admin: the broker implements ``DeadLetterAdmin`` (list and replay).
        defer_keeps_attempt: ``nack(defer=True)`` redelivers with the same ``attempt``
            (``Capabilities.defer_keeps_attempt``); when false, with ``attempt + 1``.
        carries_errors: ``nack(error=)`` reaches the redelivery and the dead letter as
            ``oncely-first-error`` and ``oncely-last-error`` (``Capabilities.carries_errors``).
        reopen: a new broker on the same location sees what a closed one left (durable
            brokers, and named ``memory://`` hubs within one process).
        visibility_seconds: a short visibility the broker honours, for the expiry cases.
            Seconds, not tenths: the extend case renews every third of it, so a stall of
            the test process over two thirds of it (a loaded CI machine) looks like a lapse.
        long_visibility_seconds: a visibility no case should outlive.
        delay_seconds: the delay used by the delay cases.
        latency: the longest a consumer may take to see a message that is available
            (polling interval, network).
        quiet_seconds: how long the suite watches for a delivery that must not happen.
        clock_skew: allowed difference between the broker's and the test's wall clocks,
            for ``enqueued_at``.
    """

    delay: bool = True
    delay_granularity: float = 0.0
    extend: bool = True
    visibility_expiry: bool = True
    lease_check: bool = True
    dlq: bool = True
    dlq_admin: bool = True
    defer_keeps_attempt: bool = True
    carries_errors: bool = False
    reopen: bool = True
    visibility_seconds: float = 1.5
    long_visibility_seconds: float = 60.0
    delay_seconds: float = 0.3
    latency: float = 3.0
    quiet_seconds: float = 0.2
    clock_skew: float = 1.0


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        pytest.fail(f"timed out after {seconds:.2f}s waiting for {what}")


class BrokerCases:
    """The fixtures and helpers the cases use; ``BrokerConformance`` composes the cases."""

    features: ClassVar[BrokerFeatures] = BrokerFeatures()

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        """Override: return a factory of connected brokers on one location per test."""
        raise NotImplementedError(f"{type(self).__name__} must define a broker_factory fixture")

    @pytest.fixture
    async def open_broker(self, broker_factory: BrokerFactory) -> AsyncIterator[BrokerFactory]:
        """The factory, wrapped so that every broker it opened is closed after the test."""
        opened: list[Broker] = []

        async def open_() -> Broker:
            broker = await broker_factory()
            opened.append(broker)
            return broker

        try:
            yield open_
        finally:
            for broker in reversed(opened):
                await broker.aclose()

    @pytest.fixture
    async def broker(self, open_broker: BrokerFactory) -> Broker:
        return await open_broker()

    @pytest.fixture
    def topic(self) -> str:
        return self.make_topic()

    def make_topic(self) -> str:
        """A topic name no other test uses."""
        return f"oncely-conformance-{uuid.uuid4().hex[:16]}"

    async def read_dead_letters(self, broker: Broker, topic: str, count: int) -> list[DeadLetter]:
        """Return the dead letters of ``topic`` once at least ``count`` are there.

        Brokers without ``DeadLetterAdmin`` override this to read their dead-letter queue.
        """
        if not isinstance(broker, DeadLetterAdmin):
            raise NotImplementedError("override read_dead_letters, or set features.dlq=False")
        with bounded(self.features.latency, f"{count} dead letter(s)"):
            # A remote broker may route dead letters asynchronously and cannot notify us.
            while len(letters := await broker.dead_letters(topic)) < count:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return letters

    # -- helpers ---------------------------------------------------------------------------

    def _visibility(self, short: bool = False) -> float:
        f = self.features
        return f.visibility_seconds if short else f.long_visibility_seconds

    async def _next(self, sub: Subscription, within: float | None = None) -> Delivery:
        with bounded(within or self.features.latency, "a delivery"):
            return await sub.__anext__()

    async def _take(self, sub: Subscription, n: int) -> list[Delivery]:
        """The next ``n`` deliveries, unsettled (so ``n`` must not exceed the prefetch)."""
        got: list[Delivery] = []
        with bounded(self.features.latency + n * 0.05, f"{n} deliveries"):
            while len(got) < n:
                got.append(await sub.__anext__())
        return got

    async def _assert_quiet(self, sub: Subscription, seconds: float | None = None) -> None:
        """Fail if ``sub`` yields anything within ``seconds``."""
        with anyio.move_on_after(seconds or self.features.quiet_seconds):
            d = await sub.__anext__()
            pytest.fail(f"unexpected delivery of {d.id} (attempt {d.attempt})")

    async def _publish_many(self, broker: Broker, topic: str, n: int) -> list[str]:
        return [await broker.publish(topic, f"m{i}".encode()) for i in range(n)]


async def settle_as(d: Delivery, how: str) -> None:
    if how == "ack":
        await d.ack()
    elif how == "nack":
        await d.nack()
    else:
        await d.reject("rejected by the conformance suite")
