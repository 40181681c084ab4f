"""The runtime on a real RabbitMQ: the same handler code as on the embedded brokers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import oncely
from examples import orders
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, delete_topology

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def test_orders_module_runs_unchanged_on_rabbitmq() -> None:
    await delete_topology("orders")  # a long-lived server may hold an earlier run's queue
    orders.placed.clear()
    settings = oncely.load_settings(
        environ={"ONCELY_BROKER": AMQP_URL, "ONCELY_STORE": "memory://"}
    )
    only = ["examples.orders.place_order"]
    try:
        async with oncely.Worker(orders.app, settings=settings, handlers=only) as w:
            for _ in range(2):
                await orders.app.publish("orders", orders.Order(id="x", sku="s", qty=1))
            await eventually(lambda: w.stats.processed + w.stats.duplicates == 2)
    finally:
        await delete_topology("orders")
    assert orders.placed == {"x": 1}
