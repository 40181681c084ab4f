"""The client ``SqsBroker`` makes (real ElasticMQ): a User-Agent fixed once per client, and
botocore's parameter validation off, with oncely's own checks still refusing bad input
before anything is sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oncely.brokers.sqs import SqsBroker
from oncely.errors import ConfigError, NotSupported, PublishFailed
from tests.brokers.test_sqs import SQS_URL, delete_queues

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]


async def test_every_request_names_oncely_and_keeps_the_users_app_id(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SDK_UA_APP_ID", "shop orders")
    agents: list[str] = []
    try:
        async with SqsBroker.from_url(SQS_URL) as broker:
            client = await broker._connected()

            def seen(request: Any, **_: Any) -> None:
                agents.append(request.headers["User-Agent"].decode())

            client.meta.events.register("before-send.sqs", seen)
            await broker.connect()
            await broker.publish(unique, b"x")
            async with broker.consume(unique, prefetch=1, visibility=30) as sub:
                d = await asyncio.wait_for(anext(sub), 10)
                await d.ack()
    finally:
        await delete_queues([unique])
    # ListQueues, the queues' creation, SendMessageBatch, ReceiveMessage, DeleteMessageBatch.
    assert len(agents) >= 5
    assert len(set(agents)) == 1, agents
    (agent,) = set(agents)
    assert agent.startswith("oncely/") and " botocore/" in agent
    assert " app/shop-orders" in agent, agent


async def test_bad_input_is_refused_by_oncely_before_anything_is_sent(unique: str) -> None:
    calls: list[str] = []
    try:
        async with SqsBroker.from_url(SQS_URL) as broker:
            client = await broker._connected()

            def seen(request: Any, **_: Any) -> None:
                calls.append(request.headers.get("X-Amz-Target", b"").decode())

            client.meta.events.register("before-send.sqs", seen)
            with pytest.raises(ConfigError, match="queue"):
                await broker.publish("not a topic!", b"x")
            with pytest.raises(PublishFailed, match="10"):
                await broker.publish(unique, b"x", headers={f"h{i}": "v" for i in range(11)})
            with pytest.raises(NotSupported, match="900"):
                await broker.publish(unique, b"x", delay=901)
            with pytest.raises(TypeError, match="str to str"):
                await broker.publish(unique, b"x", headers={"n": 1})  # type: ignore[dict-item]
    finally:
        await delete_queues([unique])
    assert not any("SendMessage" in c for c in calls), calls
