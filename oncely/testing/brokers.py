"""The broker conformance suite: one set of tests every ``Broker`` must pass.

Modelled on Watermill's universal pub/sub tests and SAQ's abstract ``TestQueue``: the cases
live on ``BrokerConformance``; a broker plugs in with a small subclass that says how to open
it and which cases apply::

    import pytest
    from oncely.testing import BrokerConformance, BrokerFactory, BrokerFeatures

    class TestRabbit(BrokerConformance):
        # AMQP cannot extend one message's visibility, and rounds delays up to buckets.
        features = BrokerFeatures(extend=False, delay_granularity=1.0, visibility_seconds=2.0)

        @pytest.fixture
        def broker_factory(self, rabbit_url: str) -> BrokerFactory:
            async def make() -> Broker:
                broker = AmqpBroker.from_url(rabbit_url)
                await broker.connect()
                return broker

            return make

Every call of the factory within one test must return a new, connected broker on the **same
location** (file, server, hub): the suite calls it twice to test close-and-reopen and to run
consumers over two connections. The suite closes what the factory returned. Topics are unique
per test (override ``make_topic`` if the broker needs another naming scheme). A broker
without ``DeadLetterAdmin`` can still run the dead-letter case by overriding
``read_dead_letters``.

Cases run under ``@pytest.mark.anyio``, so the project's ``anyio_backend`` fixture decides the
event loops. Every wait is bounded; the only sleeps let a deadline pass that is itself under
test (a delay, a visibility timeout) or give an unwanted delivery the chance to show up.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

from oncely.brokers.base import Capabilities, DeadLetter, DeadLetterAdmin, Headers
from oncely.errors import AlreadySettled, ConnectionLost, DeliveryExpired, NotSupported
from oncely.testing._select import drop_inapplicable, requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery, Subscription

__all__ = ["BrokerConformance", "BrokerFactory", "BrokerFeatures"]

BrokerFactory = Callable[[], Awaitable["Broker"]]
"""Returns a new connected broker on the location of the current test."""

_EARLY = 0.01
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
        reopen: a new broker on the same location sees what a closed one left (durable
            brokers, and named ``memory://`` hubs within one process).
        visibility_seconds: a short visibility the broker honours, for the expiry cases.
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
    reopen: bool = True
    visibility_seconds: float = 0.5
    long_visibility_seconds: float = 60.0
    delay_seconds: float = 0.3
    latency: float = 3.0
    quiet_seconds: float = 0.2
    clock_skew: float = 1.0


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        pytest.fail(f"timed out after {seconds:.2f}s waiting for {what}")


class BrokerConformance:
    """The conformance cases. Subclass it as ``TestSomething`` and provide ``broker_factory``
    (a fixture) and ``features``; see the module docstring."""

    features: ClassVar[BrokerFeatures] = BrokerFeatures()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        drop_inapplicable(cls, cls.features)

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
        with _within(self.features.latency, f"{count} dead letter(s)"):
            # A remote broker may route dead letters asynchronously and cannot notify us.
            while len(letters := await broker.dead_letters(topic)) < count:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        return letters

    # -- helpers ---------------------------------------------------------------------------

    def _visibility(self, short: bool = False) -> float:
        f = self.features
        return f.visibility_seconds if short else f.long_visibility_seconds

    async def _next(self, sub: Subscription, within: float | None = None) -> Delivery:
        with _within(within or self.features.latency, "a delivery"):
            return await sub.__anext__()

    async def _take(self, sub: Subscription, n: int) -> list[Delivery]:
        """The next ``n`` deliveries, unsettled (so ``n`` must not exceed the prefetch)."""
        got: list[Delivery] = []
        with _within(self.features.latency + n * 0.05, f"{n} deliveries"):
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

    # -- publish and consume ---------------------------------------------------------------

    @pytest.mark.anyio
    async def test_roundtrip_keeps_body_headers_and_ids(self, broker: Broker, topic: str) -> None:
        bodies = [b"", b"\x00\xff\xfe binary", "h\u00e9llo \u2713".encode(), bytes(range(256)) * 64]
        sent: dict[str, tuple[bytes, dict[str, str]]] = {}
        given = f"{topic}-given-id"
        before = time.time()
        for i, body in enumerate(bodies):
            headers = {"x-index": str(i), "x-text": "\u00fcn\u00efcode \u2603"}
            if i == 1:
                headers[Headers.KEY] = f"key-{topic}"
            mid = await broker.publish(
                topic, body, headers=headers, message_id=given if i == 2 else None
            )
            sent[mid] = (body, headers)
        after = time.time()
        assert given in sent
        assert len(sent) == len(bodies), "generated message ids must be unique"

        sub = broker.consume(topic, prefetch=10, visibility=self._visibility())
        for d in await self._take(sub, len(bodies)):
            body, headers = sent[d.id]
            assert d.body == body
            assert d.topic == topic
            assert d.attempt == 1
            assert {k: d.headers[k] for k in headers} == headers
            assert {k for k in d.headers if not k.startswith("oncely-")} == {
                k for k in headers if not k.startswith("oncely-")
            }
            assert d.key == headers.get(Headers.KEY, d.id)
            skew = self.features.clock_skew
            assert before - skew <= d.enqueued_at <= after + skew
            assert not d.settled
            await d.ack()
            assert d.settled
        await self._assert_quiet(sub)
        await sub.aclose()

    @pytest.mark.anyio
    async def test_headers_must_map_str_to_str(self, broker: Broker, topic: str) -> None:
        with pytest.raises(TypeError):
            await broker.publish(topic, b"x", headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            await broker.publish(topic, b"x", headers={2: "x"})  # type: ignore[dict-item]
        mid = await broker.publish(topic, b"ok")
        async with broker.consume(topic, prefetch=5, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            assert d.id == mid, "a publish with bad headers must store nothing"
            await d.ack()
            await self._assert_quiet(sub)

    @pytest.mark.anyio
    async def test_publish_on_one_broker_consume_on_another(
        self, broker: Broker, open_broker: BrokerFactory, topic: str
    ) -> None:
        other = await open_broker()
        for src, dst in ((broker, other), (other, broker)):
            mid = await src.publish(topic, b"across")
            async with dst.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
                d = await self._next(sub)
                assert (d.id, d.body) == (mid, b"across")
                await d.ack()

    @pytest.mark.anyio
    async def test_concurrent_consumers_share_without_loss_or_duplicates(
        self, broker: Broker, open_broker: BrokerFactory, topic: str
    ) -> None:
        n = 200
        other = await open_broker()
        async with anyio.create_task_group() as tg:
            for part in range(4):
                tg.start_soon(self._publish_part, broker, topic, part, n // 4)
        subs = [
            b.consume(topic, prefetch=8, visibility=self._visibility())
            for b in (broker, broker, other, other)
        ]
        seen: list[str] = []
        all_seen = anyio.Event()

        async def run(sub: Subscription) -> None:
            async for d in sub:
                seen.append(d.id)
                await d.ack()
                if len(seen) >= n:
                    all_seen.set()

        async with anyio.create_task_group() as tg:
            for sub in subs:
                tg.start_soon(run, sub)
            with _within(self.features.latency + n * 0.05, f"{n} messages over 4 consumers"):
                await all_seen.wait()
            # Every message is acked; anything more in this window is a duplicate.
            await anyio.sleep(self.features.quiet_seconds)
            tg.cancel_scope.cancel()
        for sub in subs:
            await sub.aclose()
        assert len(seen) == n, f"{len(seen) - len(set(seen))} duplicate deliveries"
        assert set(seen) == {f"{topic}-{i}" for i in range(n)}

    async def _publish_part(self, broker: Broker, topic: str, part: int, count: int) -> None:
        for i in range(part * count, (part + 1) * count):
            await broker.publish(topic, str(i).encode(), message_id=f"{topic}-{i}")

    # -- nack, delay, attempts -------------------------------------------------------------

    @pytest.mark.anyio
    async def test_nack_redelivers_with_attempt_incremented(
        self, broker: Broker, topic: str
    ) -> None:
        mid = await broker.publish(topic, b"again")
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            for attempt in (1, 2, 3):
                d = await self._next(sub)
                assert (d.id, d.attempt, d.body) == (mid, attempt, b"again")
                if attempt < 3:
                    await d.nack()
                    assert d.settled
            await d.ack()
            await self._assert_quiet(sub)

    @pytest.mark.anyio
    async def test_nack_does_not_hold_up_other_messages(self, broker: Broker, topic: str) -> None:
        ids = await self._publish_many(broker, topic, 10)
        failing = set(ids[::2])
        acked: dict[str, int] = {}
        async with broker.consume(topic, prefetch=4, visibility=self._visibility()) as sub:
            with _within(self.features.latency * 2, "every message to be acked"):
                while len(acked) < len(ids):
                    d = await sub.__anext__()
                    assert d.id not in acked, f"{d.id} delivered after its ack"
                    if d.id in failing and d.attempt == 1:
                        await d.nack()
                    else:
                        acked[d.id] = d.attempt
                        await d.ack()
        assert acked == {i: 2 if i in failing else 1 for i in ids}

    @pytest.mark.anyio
    @requires(delay=True)
    async def test_nack_delay_is_never_early(self, broker: Broker, topic: str) -> None:
        delay = self.features.delay_seconds
        mid = await broker.publish(topic, b"later")
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            start = time.monotonic()
            await d.nack(delay=delay)
            again = await self._next(sub, delay + self.features.delay_granularity + 2)
            elapsed = time.monotonic() - start
            assert again.id == mid and again.attempt == 2
            assert elapsed >= delay - _EARLY, f"redelivered after {elapsed:.3f}s < {delay}s"
            await again.ack()

    @pytest.mark.anyio
    @requires(delay=True)
    async def test_publish_delay_is_never_early_and_does_not_block(
        self, broker: Broker, topic: str
    ) -> None:
        delay = self.features.delay_seconds
        start = time.monotonic()
        late = await broker.publish(topic, b"late", delay=delay)
        now = await broker.publish(topic, b"now")
        async with broker.consume(topic, prefetch=2, visibility=self._visibility()) as sub:
            first = await self._next(sub)
            assert first.id == now, "a delayed message must not hold up a ready one"
            await first.ack()
            second = await self._next(sub, delay + self.features.delay_granularity + 2)
            elapsed = time.monotonic() - start
            assert second.id == late and second.attempt == 1
            assert elapsed >= delay - _EARLY, f"delivered after {elapsed:.3f}s < {delay}s"
            await second.ack()

    # -- visibility --------------------------------------------------------------------------

    @pytest.mark.anyio
    @requires(visibility_expiry=True)
    async def test_expired_visibility_redelivers(self, broker: Broker, topic: str) -> None:
        visibility = self._visibility(short=True)
        mid = await broker.publish(topic, b"slow")
        async with broker.consume(topic, prefetch=2, visibility=visibility) as sub:
            first = await self._next(sub)
            start = time.monotonic()
            again = await self._next(sub, visibility + self.features.latency)
            elapsed = time.monotonic() - start
            assert (first.id, first.attempt) == (mid, 1)
            assert (again.id, again.attempt) == (mid, 2)
            assert elapsed >= visibility - _EARLY, f"redelivered after {elapsed:.3f}s"
            await again.ack()
            await self._assert_quiet(sub)

    @pytest.mark.anyio
    @requires(visibility_expiry=True, lease_check=True)
    async def test_settle_after_lost_lease_raises_delivery_expired(
        self, broker: Broker, topic: str
    ) -> None:
        visibility = self._visibility(short=True)
        await broker.publish(topic, b"taken over")
        async with broker.consume(topic, prefetch=2, visibility=visibility) as sub:
            stale = await self._next(sub)
            fresh = await self._next(sub, visibility + self.features.latency)
            assert fresh.id == stale.id and fresh.attempt == 2
            with pytest.raises(DeliveryExpired):
                await stale.ack()
            with pytest.raises(DeliveryExpired):
                await stale.nack()
            if self.features.dlq:
                with pytest.raises(DeliveryExpired):
                    await stale.reject("too late")
            if self.features.extend:
                with pytest.raises(DeliveryExpired):
                    await stale.extend(visibility)
            assert not stale.settled
            await fresh.ack()
            await self._assert_quiet(sub)

    @pytest.mark.anyio
    @requires(extend=True)
    async def test_extend_keeps_message_invisible(
        self, broker: Broker, open_broker: BrokerFactory, topic: str
    ) -> None:
        visibility = self._visibility(short=True)
        mid = await broker.publish(topic, b"long job")
        holder = broker.consume(topic, prefetch=1, visibility=visibility)
        d = await self._next(holder)
        assert d.id == mid
        other = await open_broker()
        stolen: list[Delivery] = []

        async def poll(sub: Subscription) -> None:
            async for x in sub:
                stolen.append(x)

        async with anyio.create_task_group() as tg:
            for sub in (
                broker.consume(topic, prefetch=1, visibility=visibility),
                other.consume(topic, prefetch=1, visibility=visibility),
            ):
                tg.start_soon(poll, sub)
            until = time.monotonic() + 3 * visibility
            while time.monotonic() < until:
                await d.extend(visibility)
                await anyio.sleep(visibility / 3)
            await d.ack()
            await anyio.sleep(self.features.quiet_seconds)
            tg.cancel_scope.cancel()
        await holder.aclose()
        assert [(x.id, x.attempt) for x in stolen] == []

    @pytest.mark.anyio
    @requires(extend=False)
    async def test_extend_unsupported_raises_not_supported(
        self, broker: Broker, topic: str
    ) -> None:
        await broker.publish(topic, b"x")
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            with pytest.raises(NotSupported):
                await d.extend(5.0)
            await d.ack()

    # -- settling rules ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_settle_twice_raises_already_settled(self, broker: Broker) -> None:
        firsts = ["ack", "nack"] + (["reject"] if self.features.dlq else [])
        for first in firsts:
            topic = self.make_topic()
            await broker.publish(topic, first.encode())
            async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
                d = await self._next(sub)
                await _settle(d, first)
                assert d.settled
                for second in firsts:
                    with pytest.raises(AlreadySettled):
                        await _settle(d, second)
                if self.features.extend:
                    await d.extend(1.0)  # a no-op on a settled delivery
                if first == "nack":
                    again = await self._next(sub)
                    await again.ack()

    @pytest.mark.anyio
    async def test_prefetch_bounds_unsettled_deliveries(self, broker: Broker, topic: str) -> None:
        ids = await self._publish_many(broker, topic, 2)
        a = broker.consume(topic, prefetch=3, visibility=self._visibility())
        held = await self._take(a, 2)
        # With two unsettled, a may take one more, and must not reach for more than that.
        ids += await self._publish_many(broker, topic, 4)
        held.append(await self._next(a))
        await self._assert_quiet(a)  # full: a fourth must wait for a settle

        b = broker.consume(topic, prefetch=10, visibility=self._visibility())
        rest = await self._take(b, 3)  # so a holds exactly three, nothing hidden in a buffer
        await self._assert_quiet(b)
        assert {d.id for d in held + rest} == set(ids)
        for d in rest:
            await d.ack()
        await b.aclose()

        await held[0].ack()
        mid = await broker.publish(topic, b"one more")
        freed = await self._next(a)
        assert freed.id == mid, "a settle must free a prefetch slot"
        for d in (*held[1:], freed):
            await d.ack()
        await a.aclose()

    # -- dead letters ------------------------------------------------------------------------

    @pytest.mark.anyio
    @requires(dlq=True)
    async def test_reject_dead_letters_with_reason(self, broker: Broker, topic: str) -> None:
        mid = await broker.publish(topic, b"poison", headers={"x-origin": "test"})
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            await d.nack()
            d = await self._next(sub)
            assert d.attempt == 2
            before = time.time()
            await d.reject("cannot parse")
            assert d.settled
            await self._assert_quiet(sub)
        (letter,) = await self.read_dead_letters(broker, topic, 1)
        assert (letter.id, letter.topic, letter.body) == (mid, topic, b"poison")
        assert letter.reason == "cannot parse"
        assert letter.attempt == 2
        assert letter.headers["x-origin"] == "test"
        assert letter.headers[Headers.REASON] == "cannot parse"
        assert letter.headers[Headers.ATTEMPT] == "2"
        skew = self.features.clock_skew
        assert before - skew <= letter.failed_at <= time.time() + skew

    @pytest.mark.anyio
    @requires(dlq_admin=True)
    async def test_replay_moves_dead_letters_back(self, broker: Broker, topic: str) -> None:
        assert isinstance(broker, DeadLetterAdmin)
        ids = await self._publish_many(broker, topic, 3)
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            order = []
            for _ in ids:
                d = await self._next(sub)
                order.append(d.id)
                await d.reject(f"bad {d.id}")
            letters = await broker.dead_letters(topic)
            assert [x.id for x in letters] == order, "dead letters come oldest first"
            assert [x.reason for x in letters] == [f"bad {i}" for i in order]
            assert [x.id for x in await broker.dead_letters(topic, limit=2)] == order[:2]

            assert await broker.replay(topic, ids=[order[1]]) == 1
            d = await self._next(sub)
            assert (d.id, d.attempt) == (order[1], 1)
            await d.ack()
            assert [x.id for x in await broker.dead_letters(topic)] == [order[0], order[2]]

            assert await broker.replay(topic) == 2
            back = set()
            for _ in range(2):
                d = await self._next(sub)
                assert d.attempt == 1
                back.add(d.id)
                await d.ack()
            assert back == {order[0], order[2]}
            assert await broker.dead_letters(topic) == []
            assert await broker.replay(topic) == 0

    # -- closing -------------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_subscription_aclose_returns_buffered_and_keeps_yielded(
        self, broker: Broker, topic: str
    ) -> None:
        ids = await self._publish_many(broker, topic, 5)
        sub = broker.consume(topic, prefetch=10, visibility=self._visibility())
        kept = await self._next(sub)
        await sub.aclose()
        await sub.aclose()
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()
        # A long visibility: these must come back because aclose returned them, not by expiry.
        async with broker.consume(topic, prefetch=10, visibility=self._visibility()) as again:
            rest = await self._take(again, 4)
            await kept.ack()
            for d in rest:
                assert d.id != kept.id
                await d.ack()
            await self._assert_quiet(again)
        assert {d.id for d in rest} | {kept.id} == set(ids)

    @pytest.mark.anyio
    async def test_cancelled_next_loses_nothing(self, broker: Broker, topic: str) -> None:
        ids = await self._publish_many(broker, topic, 6)
        seen: list[str] = []
        for checkpoints in range(4):
            sub = broker.consume(topic, prefetch=3, visibility=self._visibility())
            got: list[Delivery] = []

            async def take(sub: Subscription, got: list[Delivery]) -> None:
                got.append(await sub.__anext__())

            async with anyio.create_task_group() as tg:
                tg.start_soon(take, sub, got)
                for _ in range(checkpoints):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            for d in got:
                seen.append(d.id)
                await d.ack()
            await sub.aclose()
        async with broker.consume(topic, prefetch=10, visibility=self._visibility()) as sub:
            for d in await self._take(sub, len(ids) - len(seen)):
                seen.append(d.id)
                await d.ack()
            await self._assert_quiet(sub)
        assert sorted(seen) == sorted(ids)

    @pytest.mark.anyio
    async def test_aclose_ends_a_pending_iteration(self, broker: Broker, topic: str) -> None:
        sub = broker.consume(topic, prefetch=1, visibility=self._visibility())
        ended = anyio.Event()

        async def run() -> None:
            async for d in sub:
                pytest.fail(f"unexpected delivery {d.id}")
            ended.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            await sub.aclose()
            with _within(self.features.latency, "the iteration to end"):
                await ended.wait()

    @pytest.mark.anyio
    @requires(reopen=True)
    async def test_reopen_loses_nothing(
        self, broker: Broker, open_broker: BrokerFactory, topic: str
    ) -> None:
        visibility = self._visibility(short=True)
        ids = await self._publish_many(broker, topic, 20)
        done: set[str] = set()
        sub = broker.consume(topic, prefetch=5, visibility=visibility)
        for _ in range(7):
            d = await self._next(sub)
            await d.ack()
            done.add(d.id)
        unsettled = await self._next(sub)  # left in flight across the restart
        await broker.aclose()
        await broker.aclose()

        reopened = await open_broker()
        async with reopened.consume(topic, prefetch=10, visibility=self._visibility()) as sub2:
            # The one left in flight comes back once its visibility runs out.
            with _within(self.features.latency + visibility + 1, "the rest of the messages"):
                while done != set(ids):
                    d = await sub2.__anext__()
                    assert d.id not in done, f"{d.id} redelivered after its ack"
                    await d.ack()
                    done.add(d.id)
            with pytest.raises((DeliveryExpired, ConnectionLost)):
                await unsettled.ack()
            await self._assert_quiet(sub2)
        assert done == set(ids)

    @pytest.mark.anyio
    async def test_capabilities_are_declared(self, broker: Broker, topic: str) -> None:
        caps = broker.capabilities
        assert isinstance(caps, Capabilities)
        if caps.max_delay is not None:
            with pytest.raises(NotSupported):
                await broker.publish(topic, b"x", delay=caps.max_delay + 1)


async def _settle(d: Delivery, how: str) -> None:
    if how == "ack":
        await d.ack()
    elif how == "nack":
        await d.nack()
    else:
        await d.reject("rejected by the conformance suite")
