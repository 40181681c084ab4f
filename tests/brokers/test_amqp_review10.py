"""Review 10: a failed AMQP connect leaks nothing (real RabbitMQ)."""

from __future__ import annotations

import asyncio

import pytest

from oncely.brokers.amqp import AmqpBroker
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, rabbitmqctl

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]


def _connections_named(name: str) -> int:
    listed = rabbitmqctl("list_connections", "client_properties")
    return sum(name in line for line in listed.splitlines())


async def test_a_connect_cancelled_while_it_opens_the_publish_channel_leaks_nothing(
    unique: str,
) -> None:
    """The connection is open, the publish channel not yet, when the connect is cancelled (a
    worker stopped while it starts, a timeout around it). The caller gets the error and has
    nothing to close: the connection, its reader and its reconnecting task are gone. Before,
    the robust connection stayed open (and would have reconnected for ever) until the caller
    thought of calling ``aclose`` on a broker whose connect had failed."""
    name = f"oncely-review10-{unique}"
    sep = "&" if "?" in AMQP_URL else "?"
    broker = AmqpBroker(f"{AMQP_URL}{sep}name={name}")
    before = asyncio.all_tasks()
    connecting = asyncio.create_task(broker.connect())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while broker._conn is None:  # no bounded wait of tests._wait: its 10 ms step is too coarse
        assert loop.time() < deadline, "the connection did not open within 10 s"
        await asyncio.sleep(0)
    assert broker._pub is None  # the step this test is about has not finished
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    await eventually(lambda: not asyncio.all_tasks() - before - {asyncio.current_task()})
    for _ in range(50):  # the broker drops the connection once the close is done
        if await asyncio.to_thread(_connections_named, name) == 0:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"RabbitMQ still lists the connection {name}")
    # The broker is still usable: the next connect starts afresh.
    await broker.connect()
    assert broker.connected
    await broker.aclose()
