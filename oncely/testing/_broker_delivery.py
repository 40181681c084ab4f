"""Conformance cases: publishing, consuming, and closing without loss."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from oncely.brokers.base import Capabilities, DeadLetterAdmin, Headers
from oncely.errors import ConnectionLost, DeliveryExpired, NotSupported
from oncely.testing._broker_base import BrokerCases, bounded
from oncely.testing._select import requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery, Subscription
    from oncely.testing._broker_base import BrokerFactory


class DeliveryCases(BrokerCases):
    """Publish and consume, across connections and consumers; close and reopen."""

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
            with bounded(self.features.latency + n * 0.05, f"{n} messages over 4 consumers"):
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
            with bounded(self.features.latency, "the iteration to end"):
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
            with bounded(self.features.latency + visibility + 1, "the rest of the messages"):
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

    @pytest.mark.anyio
    async def test_features_match_capabilities(self, broker: Broker) -> None:
        """The features record that picks the cases says what ``capabilities`` says, so no
        case is dropped (or run) because of a record that contradicts the broker."""
        caps, f = broker.capabilities, self.features
        wrong: list[str] = []

        def expect(ok: bool, why: str) -> None:
            if not ok:
                wrong.append(why)

        expect(f.extend == caps.extend, f"features.extend={f.extend}, capabilities.extend")
        expect(
            f.defer_keeps_attempt == caps.defer_keeps_attempt,
            f"features.defer_keeps_attempt={f.defer_keeps_attempt}, "
            "capabilities.defer_keeps_attempt",
        )
        expect(f.dlq == caps.native_dlq, f"features.dlq={f.dlq}, capabilities.native_dlq")
        expect(
            f.dlq_admin == isinstance(broker, DeadLetterAdmin),
            f"features.dlq_admin={f.dlq_admin}, but the broker "
            f"{'is' if isinstance(broker, DeadLetterAdmin) else 'is not'} a DeadLetterAdmin",
        )
        expect(not f.dlq_admin or f.dlq, "features.dlq_admin needs features.dlq")
        expect(
            not (f.delay and not caps.native_delay) or f.delay_granularity > 0,
            "an emulated delay (capabilities.native_delay=False) rounds to its buckets: "
            "set features.delay_granularity",
        )
        expect(
            not (f.delay and not caps.native_delay) or caps.max_delay is not None,
            "an emulated delay needs capabilities.max_delay",
        )
        expect(
            caps.native_delay or f.delay_granularity > 0 or not f.delay,
            "features.delay_granularity=0 claims an exact delay the broker does not have",
        )
        expect(
            not caps.durable or f.reopen,
            "capabilities.durable, so features.reopen must be true",
        )
        assert wrong == [], f"{type(broker).__name__}: " + "; ".join(wrong)
