"""Review 10: a failed AMQP connect leaks nothing (real RabbitMQ)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from oncely.brokers.amqp import AmqpBroker
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, rabbitmqctl

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]


def _no_tasks_but(before: set[asyncio.Task[object]]) -> Callable[[], bool]:
    return lambda: not asyncio.all_tasks() - before - {asyncio.current_task()}


def _connections_named(name: str) -> int:
    listed = rabbitmqctl("list_connections", "client_properties")
    return sum(name in line for line in listed.splitlines())


async def test_a_connect_cancelled_at_any_point_leaks_nothing(unique: str) -> None:
    """The connect is cancelled (a worker stopped while it starts, a timeout around it) after
    0, 1, 2, ... turns of the event loop, until one completes: through the TCP connect, the
    AMQP handshake and the publish channel's open. The caller gets the error and has nothing
    to close: no task of the connection runs on, and RabbitMQ lists no connection. Before,
    a cancel inside aio_pika.connect_robust left its reconnecting task, reader and writer
    running, and one while the publish channel opened left the whole robust connection open,
    until the process ended."""
    name = f"oncely-review10-{unique}"
    sep = "&" if "?" in AMQP_URL else "?"
    cancelled = 0
    for turns in range(200):
        broker = AmqpBroker(f"{AMQP_URL}{sep}name={name}")
        before = asyncio.all_tasks()
        connecting = asyncio.create_task(broker.connect())
        for _ in range(turns):
            await asyncio.sleep(0)
        if connecting.done():
            await connecting  # connected before this cancel point: every earlier one was tried
            await broker.aclose()
            break
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        cancelled += 1
        await eventually(_no_tasks_but(before))
        assert not broker.connected
    assert cancelled >= 3, cancelled  # the connect took several turns: the sweep meant something
    for _ in range(50):  # the broker drops a connection once its close is done
        if await asyncio.to_thread(_connections_named, name) == 0:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"RabbitMQ still lists a connection named {name}")


async def test_a_connect_that_times_out_in_the_handshake_leaks_nothing() -> None:
    """A server that accepts and never answers (a hung broker, a half-open proxy): the connect
    is given up by the caller's timeout. Before, aio_pika.connect_robust's reconnecting task
    and the connection's reader and writer ran on, with no handle left to close them."""
    held: list[asyncio.StreamWriter] = []

    async def black_hole(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The connect given up goes on in the background for the URL's timeout= (the connect
        # bound; 10 s by default, which this test used to wait out), then closes.
        broker = AmqpBroker(f"amqp://guest:guest@127.0.0.1:{port}/?timeout=1")
        before = asyncio.all_tasks()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(broker.connect(), 0.5)
        assert held  # it did reach the server
        await eventually(_no_tasks_but(before))
        assert not broker.connected
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
