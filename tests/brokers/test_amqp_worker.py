"""The runtime on a real RabbitMQ: the same handler code as on the embedded brokers."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

import oncely
from examples import orders
from oncely.brokers.base import DeadLetterAdmin
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, delete_topology

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def test_retries_dead_letters_and_dedupe_on_rabbitmq(topic: str) -> None:
    app = oncely.App()
    runs: Counter[str] = Counter()

    @app.handler(
        topic,
        idempotent=True,
        key="payload:id",
        retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01),
    )
    async def handle(p: dict[str, Any], ctx: oncely.Context) -> None:
        runs[p["id"]] += 1
        if p["id"] == "flaky" and ctx.attempt < 2:
            raise ConnectionError("downstream hiccup")
        if p["id"] == "doomed":
            raise ValueError("never works")

    store = f"memory://{topic}"
    async with oncely.Worker(app, broker=AMQP_URL, store=store) as worker:
        for pid in ("a", "a", "flaky", "doomed"):
            await app.publish(topic, {"id": pid})
        await app.publish(topic, b"\xff not json")
        # a: processed + duplicate; flaky: processed on attempt 2; doomed and the poison: DLQ.
        await eventually(
            lambda: (
                worker.stats.processed + worker.stats.duplicates == 3
                and worker.stats.dead_lettered == 2
            )
        )
        assert isinstance(worker.broker, DeadLetterAdmin)
        letters = await worker.broker.dead_letters(topic)
    assert runs == {"a": 1, "flaky": 2, "doomed": 3}
    reasons = sorted(letter.reason for letter in letters)
    assert reasons[0] == "ValueError: never works (gave up after 3 attempts)"
    assert reasons[1].startswith("undecodable payload")


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
