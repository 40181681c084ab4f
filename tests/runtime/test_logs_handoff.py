"""Lines logged by a settle a shutdown cancel handed to a task of its own (``_whole.whole``)
are about the message too: they carry its fields although ``Runner.run`` has returned."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

import oncely
from oncely._logging import LogFormatter, MessageFilter
from oncely.brokers.registry import broker_from_url
from oncely.stores.memory import MemoryStore
from tests._wait import eventually
from tests.runtime._faulty import WrappedBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class GatedStore(MemoryStore):
    """A real memory store whose ``complete`` waits for ``gate`` (so a cancel lands there)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()
        self.gate = asyncio.Event()

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().complete(key, token, result, ttl)


async def stopped_during_settle(unique: str) -> tuple[str, WrappedBroker]:
    """Run one idempotent message whose completion is being recorded when the worker stops
    with no grace; its ack then fails. Returns the message id."""
    app = oncely.App()

    @app.handler(unique, idempotent=True, key="payload:order_id")
    async def charge(order: dict[str, str]) -> None:
        return None

    def refuse(_: oncely.Delivery) -> None:
        raise oncely.ConnectionLost("broker away")

    broker = WrappedBroker(broker_from_url(f"memory://{unique}"), on_ack=refuse)
    store = GatedStore()
    worker = oncely.Worker(app, broker=broker, store=store)
    await worker.start()
    try:
        message_id = await app.publish(unique, {"order_id": "order-7"})
        await asyncio.wait_for(store.waiting.wait(), 30)
        stopping = asyncio.create_task(worker.stop(grace=0))
        await eventually(lambda: worker.in_flight == 0)  # run() returned: handed off
        store.gate.set()
        await stopping
    finally:
        store.gate.set()
        await worker.stop(grace=0)
    return message_id, broker


async def test_a_handed_off_settle_logs_with_the_message_fields(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(MessageFilter())
    caplog.set_level(logging.INFO, logger="oncely")
    message_id, _ = await stopped_during_settle(unique)
    formatter = LogFormatter("json")
    lines = [json.loads(formatter.format(r)) for r in caplog.records]
    refused = [x for x in lines if "ack of" in x["msg"]]
    assert refused, lines
    assert refused[0].get("message_id") == message_id, refused
    assert refused[0].get("key") == "order-7", refused
