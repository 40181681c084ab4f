"""A host that takes the TCP connection and never speaks AMQP (a black hole behind a load
balancer, a wrong port) bounds the AMQP connect: it fails with ``ConnectionLost`` saying so,
after the URL's ``timeout=`` (10 s when not given), instead of holding start-up for ever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from oncely.brokers._amqp_topology import parse_url
from oncely.brokers.amqp import AmqpBroker
from oncely.errors import ConnectionLost

pytestmark = pytest.mark.anyio


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A real listening socket that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_silent_host_fails_the_connect_after_the_url_timeout(silent_port: int) -> None:
    broker = AmqpBroker(f"amqp://guest:guest@127.0.0.1:{silent_port}/?timeout=0.3")
    try:
        # Before, connect() waited for ever (aio-pika 10 ignores the URL's timeout): the
        # bounded wait here gave up instead.
        with pytest.raises(ConnectionLost, match=r"no AMQP answer .* within 0\.3 s"):
            await asyncio.wait_for(broker.connect(), 30)
        with pytest.raises(ConnectionLost, match=r"within 0\.3 s"):
            await asyncio.wait_for(broker.publish("t", b"{}"), 30)
    finally:
        await broker.aclose()


def test_the_connect_is_bounded_without_a_timeout_in_the_url() -> None:
    _, options, _ = parse_url("amqp://guest:guest@127.0.0.1/")
    assert options.connect_timeout == 10.0
    assert parse_url("amqp://h/?timeout=2.5")[1].connect_timeout == 2.5
