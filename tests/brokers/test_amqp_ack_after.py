"""``AmqpDelivery.ack_after``: an ack whose batch waits for the completion it must follow
(``oncely.brokers._ack_after``), on a real RabbitMQ. What is acked is read back from the
broker itself: once the consumer's connection closes, a fresh consumer gets back exactly
what was not acked. (A subscription keeps its channel open while a delivery it handed out is
unsettled, so it is the broker's connection that is closed.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from oncely.brokers._ack_after import AckWithheld
from oncely.brokers._amqp_delivery import AmqpDelivery
from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.base import Delivery
from oncely.errors import DeliveryExpired, StoreUnavailable
from tests.brokers.test_amqp import AMQP_URL, delete_topology, nothing_within, take

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]

BATCHED = AMQP_URL
ONE_BY_ONE = f"{AMQP_URL}?batch_acks=0"


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def _redelivered(topic: str, n: int) -> list[bytes]:
    """What a fresh consumer gets back: ``n`` messages, then nothing more."""
    async with AmqpBroker(AMQP_URL) as other, other.consume(topic, prefetch=10, visibility=30) as s:
        got = await take(s, n)
        await nothing_within(s, 0.3)
        bodies = sorted(d.body for d in got)
        for d in got:
            await d.ack()
        return bodies


def _amqp(delivery: Delivery) -> AmqpDelivery:
    assert isinstance(delivery, AmqpDelivery)
    return delivery


Acking = tuple[Delivery, "asyncio.Future[None]", "asyncio.Future[None]"]


@contextlib.asynccontextmanager
async def _acking_one(broker: AmqpBroker, topic: str) -> AsyncIterator[Acking]:
    """One message published and taken, its ``ack_after`` started on a fresh condition:
    ``(delivery, condition, the ack_after future)``, while the subscription is open."""
    await broker.publish(topic, b"one")
    condition: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with broker.consume(topic, prefetch=5, visibility=30) as sub:
        (d,) = await take(sub, 1)
        yield d, condition, asyncio.ensure_future(_amqp(d).ack_after(condition))


@pytest.mark.parametrize("url", [BATCHED, ONE_BY_ONE])
async def test_nothing_is_acked_before_its_condition(topic: str, url: str) -> None:
    async with AmqpBroker(url) as broker:
        async with _acking_one(broker, topic) as (_, condition, acking):
            await asyncio.sleep(0.3)  # give an unconditional ack ample time to go out
            assert not acking.done()
    # The connection closed with the condition still open: the message was not acked.
    assert await _redelivered(topic, 1) == [b"one"]
    condition.set_result(None)
    with pytest.raises(DeliveryExpired):
        await acking


@pytest.mark.parametrize("url", [BATCHED, ONE_BY_ONE])
async def test_acked_once_its_condition_holds(topic: str, url: str) -> None:
    async with AmqpBroker(url) as broker:
        async with _acking_one(broker, topic) as (d, condition, acking):
            asyncio.get_running_loop().call_later(0.05, condition.set_result, None)
            await acking
            assert d.settled
    async with AmqpBroker(AMQP_URL) as other, other.consume(topic, prefetch=5, visibility=30) as s:
        await nothing_within(s, 0.5)


@pytest.mark.parametrize("url", [BATCHED, ONE_BY_ONE])
async def test_a_failed_condition_withholds_the_ack_and_leaves_the_delivery_open(
    topic: str, url: str
) -> None:
    async with AmqpBroker(url) as broker:
        async with _acking_one(broker, topic) as (d, condition, acking):
            down = StoreUnavailable("redis is down")
            asyncio.get_running_loop().call_later(0.05, condition.set_exception, down)
            with pytest.raises(AckWithheld) as withheld:
                await acking
            assert withheld.value.error is down
            assert not d.settled
            # Still this consumer's to settle: here a plain ack, as the runtime does after
            # recording the completion again.
            await d.ack()
            assert d.settled
    async with AmqpBroker(AMQP_URL) as other, other.consume(topic, prefetch=5, visibility=30) as s:
        await nothing_within(s, 0.5)


async def test_one_batch_acks_what_was_recorded_and_no_multiple_ack_covers_the_rest(
    topic: str,
) -> None:
    """Five deliveries in one ack batch; the lowest and a middle tag's conditions fail. The
    others are acked; a ``multiple=True`` frame over the failed tags would lose them."""
    async with AmqpBroker(BATCHED) as broker:
        for i in range(5):
            await broker.publish(topic, b"%d" % i)
        loop = asyncio.get_running_loop()
        conditions = [loop.create_future() for _ in range(5)]
        async with broker.consume(topic, prefetch=10, visibility=30) as sub:
            got = await take(sub, 5)
            assert [d.body for d in got] == [b"0", b"1", b"2", b"3", b"4"]
            acking = [
                asyncio.ensure_future(_amqp(d).ack_after(c))
                for d, c in zip(got, conditions, strict=True)
            ]
            await asyncio.sleep(0)  # the batch's flush may start waiting (either way, the same)
            for i, condition in enumerate(conditions):
                if i in (0, 2):
                    condition.set_exception(StoreUnavailable(f"lost {i}"))
                else:
                    condition.set_result(None)
            outcomes = await asyncio.gather(*acking, return_exceptions=True)
            withheld = [isinstance(o, AckWithheld) for o in outcomes]
            assert withheld == [True, False, True, False, False]
            assert [d.settled for d in got] == [False, True, False, True, True]
    # Exactly the two withheld come back.
    assert await _redelivered(topic, 2) == [b"0", b"2"]


async def test_a_cancelled_condition_withholds_too(topic: str) -> None:
    async with AmqpBroker(BATCHED) as broker:
        async with _acking_one(broker, topic) as (d, condition, acking):
            condition.cancel()  # the store's batch, cancelled as its loop ends
            with pytest.raises(AckWithheld) as withheld:
                await acking
            assert isinstance(withheld.value.error, StoreUnavailable)
            assert not d.settled
    assert await _redelivered(topic, 1) == [b"one"]
