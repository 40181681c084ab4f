"""AmqpBroker under faults: a full RabbitMQ restart mid-consumption, and a SIGKILLed worker.

The restart test stops and starts the local broker with ``rabbitmqctl shutdown`` and
``rabbitmq-server -detached`` (a real process restart: queues and messages are recovered from
disk). Override the commands with ``ONCELY_TEST_AMQP_STOP`` / ``ONCELY_TEST_AMQP_START``, e.g.
``docker compose stop rabbitmq`` / ``docker compose start rabbitmq``. The broker is started
again even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aio_pika
import pytest

from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.base import Delivery
from oncely.errors import ConnectionLost, DeliveryExpired, PublishFailed
from tests.brokers.test_amqp import (
    AMQP_URL,
    delete_topology,
    nothing_within,
    rabbitmqctl,
    take,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

STOP = os.environ.get("ONCELY_TEST_AMQP_STOP", "rabbitmqctl shutdown")
START = os.environ.get("ONCELY_TEST_AMQP_START", "rabbitmq-server -detached")

pytestmark = [
    pytest.mark.amqp,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


def _port_open() -> bool:
    parts = urlsplit(AMQP_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1):
            return True
    except OSError:
        return False


def _ensure_running(timeout: float = 90) -> None:
    """Start RabbitMQ if it is down and wait until AMQP accepts connections."""
    if not _port_open():
        subprocess.run(shlex.split(START), check=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while not _port_open():
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ did not come back within {timeout}s after {START!r}")
        time.sleep(0.5)


def _stop() -> None:
    subprocess.run(shlex.split(STOP), check=True, timeout=120, capture_output=True)
    assert not _port_open(), "RabbitMQ still accepts connections after the stop command"


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_broker_restart_mid_consumption_loses_nothing(
    topic: str, queue_type: str, report: Callable[[str], None]
) -> None:
    n = 500
    url = f"{AMQP_URL}?queue_type={queue_type}&publish_timeout=2"
    async with AmqpBroker(url) as publisher:
        ids = set(await asyncio.gather(*(publisher.publish(topic, b"%d" % i) for i in range(n))))
    assert len(ids) == n

    handled: Counter[str] = Counter()
    failed_acks = 0
    handlers: set[asyncio.Task[None]] = set()
    restart: asyncio.Task[None] | None = None
    down = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def restart_broker() -> None:
        marks["stop"] = time.monotonic() - t0
        _stop()
        marks["down"] = time.monotonic() - t0
        loop.call_soon_threadsafe(down.set)
        _ensure_running()
        marks["up"] = time.monotonic() - t0

    async def handle(d: Delivery) -> None:
        nonlocal failed_acks
        handled[d.id] += 1
        if "up" in marks and "first_after_up" not in marks:
            marks["first_after_up"] = time.monotonic() - t0
        if len(handled) == n and "all_seen" not in marks:
            marks["all_seen"] = time.monotonic() - t0
        if restart is not None and not down.is_set():
            # In flight while the broker stops: this ack must fail and the message come back.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(down.wait(), 120)
        else:
            await asyncio.sleep(random.uniform(0.002, 0.02))  # the handler's work
        try:
            await d.ack()
        except (DeliveryExpired, ConnectionLost):
            failed_acks += 1  # the broker redelivers it

    async def publish_during_outage(broker: AmqpBroker) -> None:
        await down.wait()
        started = time.monotonic()
        with pytest.raises((ConnectionLost, PublishFailed)):
            await broker.publish(topic, b"during the outage")
        marks["outage_publish_failed_after"] = time.monotonic() - started

    try:
        async with AmqpBroker(url) as consumer:
            probe = asyncio.create_task(publish_during_outage(consumer))
            async with consumer.consume(topic, prefetch=20, visibility=60) as sub:
                # Handlers run concurrently, as in a worker; after every id was seen, keep
                # draining redeliveries until the queue stays quiet for 2 s.
                deadline = time.monotonic() + 100
                while True:
                    try:
                        (d,) = await take(sub, 1, within=2)
                    except TimeoutError:
                        if len(handled) == n:
                            break
                        assert time.monotonic() < deadline, f"stuck at {len(handled)}/{n}"
                        continue
                    task = asyncio.create_task(handle(d))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
                    if restart is None and len(handled) >= n // 3:
                        marks["handled_at_stop"] = len(handled)
                        restart = asyncio.create_task(asyncio.to_thread(restart_broker))
                await asyncio.gather(*handlers)
            await probe
        assert restart is not None
        await restart
    finally:
        if restart is not None and not restart.done():
            with contextlib.suppress(Exception):
                await restart
        await asyncio.to_thread(_ensure_running)
    marks["done"] = time.monotonic() - t0

    total = sum(handled.values())
    duplicates = total - n
    lost = len(ids - set(handled))
    figures = dict(
        published=n,
        handled=total,
        unique=len(handled),
        duplicates=duplicates,
        lost=lost,
        failed_acks=failed_acks,
    )
    summary = " ".join(f"{k}={v}" for k, v in figures.items())
    timeline = " ".join(f"{k}={v:.1f}s" for k, v in marks.items() if k != "handled_at_stop")
    report(f"amqp restart ({queue_type}, prefetch 20): {summary}; {timeline}")
    assert set(handled) == ids
    assert lost == 0
    assert marks["handled_at_stop"] < n and failed_acks > 0, "the stop did not hit in-flight work"
    await assert_empty(topic)


async def assert_empty(topic: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topic, ensure=True)
        assert queue.declaration_result.message_count == 0


async def test_consumer_timeout_closes_channel_and_requeues_all(topic: str) -> None:
    """What the module docstring promises when ``consumer_timeout`` fires (3.10: global).

    The broker's timeout and its check interval are lowered to 1 s until the first timeout
    fired (a few seconds), then restored; they are read live, so this briefly affects every
    channel on the node.
    """

    def set_env(timeout_ms: str, tick_ms: str) -> None:
        rabbitmqctl(
            "eval",
            f"application:set_env(rabbit, consumer_timeout, {timeout_ms}), "
            f"application:set_env(rabbit, channel_tick_interval, {tick_ms}).",
        )

    def get_env(key: str) -> str:
        out = rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()
        assert out.startswith("{ok,"), out
        return out[4:-1]

    saved = (get_env("consumer_timeout"), get_env("channel_tick_interval"))
    async with AmqpBroker(AMQP_URL) as broker:
        await broker.publish(topic, b"a")
        await broker.publish(topic, b"b")
        await asyncio.to_thread(set_env, "1000", "1000")
        try:
            async with broker.consume(topic, prefetch=5, visibility=60) as sub:
                a, b = await take(sub, 2)
                try:
                    # Held past the timeout: the broker closes the channel, requeues both,
                    # and the subscription receives them again on a new channel.
                    (first,) = await take(sub, 1, within=30)
                finally:
                    await asyncio.to_thread(set_env, *saved)
                with pytest.raises(DeliveryExpired):
                    await a.ack()
                with pytest.raises(DeliveryExpired):
                    await b.nack()
                # Until the settings are back the new channel may time out too, and an ack
                # racing a channel close is dropped by the broker (AMQP acks are unconfirmed):
                # drain until both were acked and the queue stays quiet.
                acked: list[bytes] = []
                pending = [first]
                while True:
                    for d in pending:
                        assert d.attempt >= 2
                        with contextlib.suppress(DeliveryExpired):
                            await d.ack()
                            acked.append(d.body)
                    try:
                        pending = await take(sub, 1, within=3)
                    except TimeoutError:
                        break
                assert {b"a", b"b"} <= set(acked)
        finally:
            await asyncio.to_thread(set_env, *saved)
    await assert_empty(topic)


WORKER = """
import asyncio, sys
from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.base import Delivery

async def main(url: str, topic: str) -> None:
    async with AmqpBroker(url) as broker:
        async with broker.consume(topic, prefetch=1, visibility=60) as sub:
            d = await anext(sub)
            sys.stdout.write(f"handling {d.id} {d.attempt}\\n")
            sys.stdout.flush()
            await asyncio.sleep(3600)  # killed here, mid-handler

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_sigkilled_worker_message_goes_to_another_consumer(topic: str) -> None:
    async with AmqpBroker(AMQP_URL) as broker:
        mid = await broker.publish(topic, b"work")
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, AMQP_URL, topic, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 30)
            assert line.decode().split() == ["handling", mid, "1"]
            async with broker.consume(topic, prefetch=1, visibility=60) as sub:
                await nothing_within(sub, 0.5)  # the worker holds it
                worker.send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(worker.wait(), 10) == -signal.SIGKILL
                (d,) = await take(sub, 1, within=30)
                assert (d.id, d.body, d.attempt) == (mid, b"work", 2)
                await d.ack()
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
