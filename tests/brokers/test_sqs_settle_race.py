"""An SQS settle cannot be withdrawn once its entry is queued for a batch call: a cancelled
``ack`` still deletes, a ``nack`` still resets the visibility. These tests drive the races
with a long ``ack_window`` (nothing goes out until a flush), on ElasticMQ."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

import pytest

from oncely.brokers._sqs_options import parse_url
from oncely.brokers.sqs import SqsBroker
from oncely.errors import AlreadySettled
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, queue_counts, topics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from oncely.brokers._sqs_consume import SqsSubscription
    from oncely.brokers._sqs_delivery import SqsDelivery

__all__ = ["topics"]  # the fixture (from test_sqs), used by name

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]


@pytest.fixture
async def broker(topics: list[str]) -> AsyncIterator[SqsBroker]:
    # Settles wait an hour for company: only ``_flush`` sends them, in the test's order.
    options = dataclasses.replace(parse_url(SQS_URL), ack_window=3600.0)
    async with SqsBroker(SQS_URL, options=options) as b:
        yield b


async def _one(broker: SqsBroker, topic: str) -> tuple[SqsSubscription, SqsDelivery]:
    await broker.publish(topic, b"x")
    sub = broker.consume(topic, prefetch=1, visibility=60)
    delivery = await asyncio.wait_for(anext(sub), 10)
    return sub, delivery


def _deletes(broker: SqsBroker) -> int:
    """Delete entries queued or in flight (the test's one queue)."""
    return sum(len(batcher) for batcher in broker._deleters.values())


async def test_a_cancelled_ack_counts_as_settled_and_is_not_given_back(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """A shutdown cancel during ``ack``: the runtime gives back what is not settled
    (``nack(0)``). The delete was already queued and goes out anyway, so a give-back raced
    it: flushed first, the nack reported the message returned, then the delete removed it.
    The cancelled ack must leave the delivery settled (no visibility change is made)."""
    topics.append(unique)
    _, d = await _one(broker, unique)
    ack = asyncio.ensure_future(d.ack())
    await eventually(lambda: _deletes(broker) == 1)
    ack.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ack
    # What the runtime does with a delivery a cancel left unsettled: give it back.
    given_back = None
    if not d.settled:
        given_back = asyncio.ensure_future(d.nack(0))
    # The visibility reset first, then the delete: the order the race could take.
    url, _ = await broker.queue_urls(unique)
    await eventually(
        lambda: given_back is None or len(broker._batcher("change_visibility", url)) == 1
    )
    await broker._batcher("change_visibility", url).flush()
    if given_back is not None:
        await given_back  # reported: the message is back in the queue
    await broker._batcher("delete", url).flush()
    if given_back is not None:
        assert await queue_counts(unique) == ("1", "0"), "given back, then deleted"
    assert d.settled
    with pytest.raises(AlreadySettled):
        await d.nack(0)
    assert broker.api_calls["change_visibility"] == 0
    assert await queue_counts(unique) == ("0", "0")


async def test_extend_while_an_ack_is_on_its_way_changes_nothing(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """The heartbeat may beat a delivery whose ack has started (a beat begun just before the
    handler ended): its visibility change and the delete race. After the delete it failed
    with ``DeliveryExpired`` and the delivery was counted as given back; it must do nothing."""
    topics.append(unique)
    _, d = await _one(broker, unique)
    ack = asyncio.ensure_future(d.ack())
    await eventually(lambda: _deletes(broker) == 1)
    extend = asyncio.ensure_future(d.extend(60))
    url, _ = await broker.queue_urls(unique)
    await broker._batcher("delete", url).flush()
    await ack
    await broker._batcher("change_visibility", url).flush()
    await extend  # raised DeliveryExpired before: the handle was gone
    assert broker.api_calls["change_visibility"] == 0
    assert await queue_counts(unique) == ("0", "0")


async def test_extend_while_a_nack_is_on_its_way_does_not_undo_it(
    broker: SqsBroker, unique: str, topics: list[str]
) -> None:
    """A beat during ``nack(0)``: both visibility changes share a batch call and the later
    one won, so the message stayed invisible a whole visibility window instead of coming
    back at once."""
    topics.append(unique)
    sub, d = await _one(broker, unique)
    nack = asyncio.ensure_future(d.nack(0))
    url, _ = await broker.queue_urls(unique)
    batcher = broker._batcher("change_visibility", url)
    await eventually(lambda: len(batcher) == 1)
    extend = asyncio.ensure_future(d.extend(60))
    await asyncio.wait_for(batcher.flush(), 10)
    await nack
    await extend
    again = await asyncio.wait_for(anext(sub), 10)  # at once, not in 60 s
    assert (again.id, again.attempt) == (d.id, 2)


async def test_a_cancelled_ack_whose_delete_fails_is_logged(
    broker: SqsBroker, unique: str, topics: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Its caller gone, a refused delete was dropped without a word (the batcher only sets
    the outcome of a future still awaited): the message came back later, unexplained."""
    topics.append(unique)
    _, d = await _one(broker, unique)
    d.receipt = "not-a-receipt-handle"  # as if received again elsewhere: SQS refuses it
    ack = asyncio.ensure_future(d.ack())
    await eventually(lambda: _deletes(broker) == 1)
    ack.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ack
    url, _ = await broker.queue_urls(unique)
    with caplog.at_level(logging.WARNING, "oncely.brokers.sqs"):
        await broker._batcher("delete", url).flush()
    assert "1 SQS batch entry whose caller was cancelled failed" in caplog.text
    assert "ReceiptHandleIsInvalid" in caplog.text
