"""Every broker carries trace headers as it got them: ``traceparent``, a ``tracestate`` and a
``baggage`` with the characters those formats use, through a delivery, a nack's redelivery and
a dead letter's replay. (The runtime tests in ``test_traces.py`` check the spans they make.)"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.base import DeadLetterAdmin, Delivery, Subscription
from oncely.brokers.registry import broker_from_url
from tests.tracing.conftest import topics

if TYPE_CHECKING:
    from collections.abc import Mapping

pytestmark = pytest.mark.anyio

TRACE_HEADERS = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,vendor@sys=a/b+c",
    "baggage": "user.id=alice%20b,tier=gold;ttl=60, region=eu-west-1",
}


def traced(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in TRACE_HEADERS}


async def next_delivery(sub: Subscription) -> Delivery:
    async with asyncio.timeout(60):
        return await sub.__anext__()


async def test_trace_headers_survive_delivery_nack_and_replay(broker_url: str, unique: str) -> None:
    topic = topics(unique)[0]
    broker = broker_from_url(broker_url)
    await broker.connect()
    try:
        await broker.publish(topic, b"{}", headers=TRACE_HEADERS)
        sub = broker.consume(topic, prefetch=1, visibility=30)
        try:
            first = await next_delivery(sub)
            assert traced(first.headers) == TRACE_HEADERS
            await first.nack(0.0)
            again = await next_delivery(sub)
            assert traced(again.headers) == TRACE_HEADERS
            assert again.attempt == 2
            await again.reject("for the replay")
            assert isinstance(broker, DeadLetterAdmin)
            (letter,) = await broker.dead_letters(topic)
            assert traced(letter.headers) == TRACE_HEADERS
            assert await broker.replay(topic) == 1
            replayed = await next_delivery(sub)
            assert traced(replayed.headers) == TRACE_HEADERS
            await replayed.ack()
        finally:
            await sub.aclose()
    finally:
        await broker.aclose()
