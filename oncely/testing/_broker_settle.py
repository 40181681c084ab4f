"""Conformance cases: ack, nack, delays and attempts, and what settling frees."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from oncely.errors import AlreadySettled
from oncely.testing._broker_base import EARLY, BrokerCases, bounded, settle_as
from oncely.testing._select import requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker


class SettleCases(BrokerCases):
    """Nack and its delay, the attempt count, settling twice, prefetch slots."""

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
    async def test_deferral_keeps_the_attempt_where_the_broker_can(
        self, broker: Broker, topic: str
    ) -> None:
        """``nack(defer=True)`` (the handler did not run) redelivers with the same attempt
        where ``defer_keeps_attempt``, with the next one otherwise; a plain nack still counts."""
        keeps = broker.capabilities.defer_keeps_attempt
        assert keeps == self.features.defer_keeps_attempt
        mid = await broker.publish(topic, b"deferred")
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            assert (d.id, d.attempt) == (mid, 1)
            seen = [d.attempt]
            for _ in range(2):
                await d.nack(defer=True)
                assert d.settled
                d = await self._next(sub)
                assert (d.id, d.body) == (mid, b"deferred")
                seen.append(d.attempt)
            await d.nack()
            d = await self._next(sub)
            seen.append(d.attempt)
            await d.ack()
            await self._assert_quiet(sub)
        assert seen == ([1, 1, 1, 2] if keeps else [1, 2, 3, 4])

    @pytest.mark.anyio
    async def test_nack_does_not_hold_up_other_messages(self, broker: Broker, topic: str) -> None:
        ids = await self._publish_many(broker, topic, 10)
        failing = set(ids[::2])
        acked: dict[str, int] = {}
        async with broker.consume(topic, prefetch=4, visibility=self._visibility()) as sub:
            with bounded(self.features.latency * 2, "every message to be acked"):
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
            assert elapsed >= delay - EARLY, f"redelivered after {elapsed:.3f}s < {delay}s"
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
            assert elapsed >= delay - EARLY, f"delivered after {elapsed:.3f}s < {delay}s"
            await second.ack()

    # -- settling rules ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_settle_twice_raises_already_settled(self, broker: Broker) -> None:
        firsts = ["ack", "nack"] + (["reject"] if self.features.dlq else [])
        for first in firsts:
            topic = self.make_topic()
            await broker.publish(topic, first.encode())
            async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
                d = await self._next(sub)
                await settle_as(d, first)
                assert d.settled
                for second in firsts:
                    with pytest.raises(AlreadySettled):
                        await settle_as(d, second)
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
