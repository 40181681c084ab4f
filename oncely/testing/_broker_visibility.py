"""Conformance cases: visibility timeouts, lost leases and ``extend``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from oncely.errors import DeliveryExpired, NotSupported
from oncely.testing._broker_base import EARLY, BrokerCases
from oncely.testing._select import requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery, Subscription
    from oncely.testing._broker_base import BrokerFactory


class VisibilityCases(BrokerCases):
    """An unsettled delivery comes back; a stale one cannot be settled."""

    # -- visibility --------------------------------------------------------------------------

    @pytest.mark.anyio
    @requires(visibility_expiry=True)
    async def test_expired_visibility_redelivers(self, broker: Broker, topic: str) -> None:
        visibility = self._visibility(short=True)
        mid = await broker.publish(topic, b"slow")
        # Timed from before the subscription exists: the broker's timer starts when the
        # subscription fetched the message, which may be well before it is handed over (it
        # sat in the prefetch buffer meanwhile), but never before the subscription began.
        start = time.monotonic()
        async with broker.consume(topic, prefetch=2, visibility=visibility) as sub:
            first = await self._next(sub)
            again = await self._next(sub, visibility + self.features.latency)
            elapsed = time.monotonic() - start
            assert (first.id, first.attempt) == (mid, 1)
            assert (again.id, again.attempt) == (mid, 2)
            assert elapsed >= visibility - EARLY, f"redelivered after {elapsed:.3f}s"
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
