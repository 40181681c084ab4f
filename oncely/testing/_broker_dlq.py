"""Conformance cases: ``reject`` and the dead-letter queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.base import DeadLetterAdmin, Headers
from oncely.testing._broker_base import BrokerCases
from oncely.testing._select import requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker


class DeadLetterCases(BrokerCases):
    """Reject dead-letters with a reason; replay moves dead letters back."""

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

    @pytest.mark.anyio
    @requires(dlq=True, carries_errors=True)
    async def test_nack_errors_reach_the_dead_letter(self, broker: Broker, topic: str) -> None:
        """Where ``Capabilities.carries_errors``: each redelivery carries the first error
        (set once) and the latest, and the dead letter keeps both."""
        assert broker.capabilities.carries_errors
        mid = await broker.publish(topic, b"failing")
        async with broker.consume(topic, prefetch=1, visibility=self._visibility()) as sub:
            d = await self._next(sub)
            assert Headers.FIRST_ERROR not in d.headers
            await d.nack(error="E1")
            d = await self._next(sub)
            assert (d.id, d.attempt) == (mid, 2)
            assert (d.headers[Headers.FIRST_ERROR], d.headers[Headers.LAST_ERROR]) == ("E1", "E1")
            await d.nack(error="E2")
            d = await self._next(sub)
            assert (d.headers[Headers.FIRST_ERROR], d.headers[Headers.LAST_ERROR]) == ("E1", "E2")
            await d.reject("E3")
            await self._assert_quiet(sub)
        (letter,) = await self.read_dead_letters(broker, topic, 1)
        assert (letter.first_error, letter.last_error, letter.attempt) == ("E1", "E3", 3)
        assert letter.headers[Headers.LAST_ERROR] == "E2"
