"""AmqpBroker against a real RabbitMQ (``scripts/services.sh up``).

The URL comes from ``ONCELY_TEST_AMQP_URL``. A missing server fails these tests: they are
never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.queue import consumer as aio_pika_consumer
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from oncely.brokers._amqp_consume import AmqpSubscription, consumer_timeout_ms
from oncely.brokers._amqp_delivery import AmqpDelivery
from oncely.brokers._amqp_message import parse
from oncely.brokers._amqp_topology import (
    BUCKETS,
    bucket_for,
    bucket_name,
    dlq_name,
    parse_url,
    topology,
)
from oncely.brokers.amqp import AmqpBroker
from oncely.brokers.base import Delivery, Headers, Subscription
from oncely.brokers.registry import broker_from_url
from oncely.errors import (
    AlreadySettled,
    ConfigError,
    DeliveryExpired,
    NotSupported,
    PublishFailed,
)
from tests._wait import eventually

AMQP_URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

pytestmark = pytest.mark.amqp


async def delete_topology(topic: str) -> None:
    """Delete every queue AmqpBroker declares for ``topic`` (missing ones are fine)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name, _ in topology(topic, "classic"):
            await channel.queue_delete(name)


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


@pytest.fixture
async def broker() -> AsyncIterator[AmqpBroker]:
    async with AmqpBroker(AMQP_URL) as b:
        yield b


@pytest.fixture
async def plain() -> AsyncIterator[AbstractRobustConnection]:
    """A plain aio-pika connection, for interop and for poking at the broker."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        yield connection


async def take(sub: Subscription, n: int, within: float = 10.0) -> list[Delivery]:
    out: list[Delivery] = []
    async with asyncio.timeout(within):
        while len(out) < n:
            out.append(await anext(sub))
    return out


async def nothing_within(sub: Subscription, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(sub), seconds)


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def close_connections_named(name: str) -> int:
    """Have the broker close (CONNECTION_FORCED) every connection with this client name."""
    closed = 0
    for line in rabbitmqctl("list_connections", "pid", "name", "client_properties").splitlines():
        if name in line:
            rabbitmqctl("close_connection", line.split("\t", 1)[0], "test: forced close")
            closed += 1
    return closed


# ------------------------------------------------------------------------- configuration


def test_url_options() -> None:
    b = broker_from_url("amqp://u:secret@h:5672/vh?queue_type=quorum&publish_timeout=5")
    assert isinstance(b, AmqpBroker)
    assert b.options.queue_type == "quorum"
    assert b.options.publish_timeout == 5
    assert "secret" not in b.url and "***" in b.url
    driver_url, options, _ = parse_url("amqps://h/?heartbeat=10&batch_acks=0")
    assert "heartbeat=10" in driver_url and "queue_type" not in driver_url
    assert options.batch_acks is False
    for bad in (
        "amqp://h/?queue_typ=quorum",
        "amqp://h/?queue_type=stream",
        "amqp://h/?publish_timeout=-1",
        "amqp://h/?batch_acks=maybe",
    ):
        with pytest.raises(ConfigError):
            AmqpBroker(bad)


def test_capabilities() -> None:
    caps = AmqpBroker.capabilities
    assert (caps.native_delay, caps.native_dlq, caps.extend) == (False, True, False)
    assert caps.max_delay == BUCKETS[-1][0] == 3600
    assert caps.ordering == "queue"


def test_delay_rounds_up_to_a_bucket() -> None:
    assert bucket_for(0) is None
    assert bucket_for(0.001) == (1, "1s")
    assert bucket_for(1) == (1, "1s")
    assert bucket_for(1.0001) == (5, "5s")
    assert bucket_for(31) == (120, "2m")
    assert bucket_for(3600) == (3600, "1h")
    with pytest.raises(NotSupported):
        bucket_for(3600.5)
    with pytest.raises(ValueError):
        bucket_for(-1)


def test_id_falls_back_to_body_hash_and_attempt_to_redelivered_flag() -> None:
    def message(props: Basic.Properties, redelivered: bool) -> AbstractIncomingMessage:
        raw = DeliveredMessage(
            delivery=Basic.Deliver(consumer_tag="c", delivery_tag=1, redelivered=redelivered),
            header=ContentHeader(properties=props),
            body=b"payload",
            channel=None,  # type: ignore[arg-type]
        )
        return aio_pika.IncomingMessage(raw)

    a = parse(message(Basic.Properties(headers={"n": 5, "b": b"x"}), redelivered=False))
    b = parse(message(Basic.Properties(), redelivered=True))
    assert a.id == b.id and a.id.startswith("sha256:")
    assert (a.attempt, b.attempt) == (1, 2)
    assert a.headers == {"n": "5", "b": "x"}
    q = parse(message(Basic.Properties(headers={"x-delivery-count": 2}), redelivered=True))
    assert q.attempt == 3  # quorum queues count redeliveries exactly


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.anyio
async def test_publish_consume_ack(broker: AmqpBroker, topic: str) -> None:
    before = time.time()
    mid = await broker.publish(topic, b"hello", headers={"k": "v", Headers.KEY: "key-1"})
    async with broker.consume(topic, prefetch=5, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert (d.id, d.body, d.attempt, d.key, d.topic) == (mid, b"hello", 1, "key-1", topic)
        assert d.headers["k"] == "v" and d.headers[Headers.MESSAGE_ID] == mid
        assert before - 1 <= d.enqueued_at <= time.time()
        await d.ack()
        assert d.settled
        with pytest.raises(AlreadySettled):
            await d.ack()
        with pytest.raises(NotSupported):
            await d.extend(10)
    async with AmqpBroker(AMQP_URL) as other, other.consume(topic, prefetch=5, visibility=30) as s:
        await nothing_within(s, 0.5)


async def on_the_fast_path(sub: Subscription) -> bool:
    """Whether aiormq hands this subscription's deliveries straight to it (not through
    aio-pika's IncomingMessage path)."""
    assert isinstance(sub, AmqpSubscription) and sub._channel is not None
    raw: Any = await sub._channel.get_underlay_channel()
    return bool(raw.consumers.get(sub._ctag) == sub._on_delivered)


@pytest.mark.anyio
async def test_both_consumer_paths_yield_the_same_delivery(broker: AmqpBroker, topic: str) -> None:
    await broker.publish(topic, b"zero")  # may arrive with consume-ok, before the take-over
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        (first,) = await take(sub, 1)
        await first.ack()
        assert await on_the_fast_path(sub)
        await broker.publish(topic, b"one", headers={"k": "v"}, message_id="m1")
        (fast,) = await take(sub, 1)
        assert isinstance(sub, AmqpSubscription) and sub._channel is not None
        raw: Any = await sub._channel.get_underlay_channel()
        # Put aio-pika's own callback back, as it is before a take-over.
        slow_path = functools.partial(aio_pika_consumer, sub._on_message, no_ack=False)
        raw.consumers[sub._ctag] = slow_path
        await fast.ack()
        await broker.publish(topic, b"two", headers={"k": "v"}, message_id="m2")
        (slow,) = await take(sub, 1)
        for d, (mid, body) in ((fast, ("m1", b"one")), (slow, ("m2", b"two"))):
            assert (d.id, d.body, d.attempt, d.headers["k"]) == (mid, body, 1, "v")
        assert fast.headers.keys() == slow.headers.keys()
        await slow.nack()  # the republish copies the same properties on both paths
        (again,) = await take(sub, 1)
        assert (again.id, again.body, again.attempt, again.headers["k"]) == ("m2", b"two", 2, "v")
        await again.ack()


@pytest.mark.anyio
async def test_given_message_id_is_kept(broker: AmqpBroker, topic: str) -> None:
    assert await broker.publish(topic, b"x", message_id="order-42") == "order-42"
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert d.id == d.key == "order-42"
        await d.ack()


@pytest.mark.anyio
async def test_plain_aio_pika_publisher_is_consumable(
    broker: AmqpBroker, plain: AbstractRobustConnection, topic: str
) -> None:
    await broker._ensure_topology(topic)
    channel = await plain.channel()
    stamp = time.time() - 100
    message = aio_pika.Message(
        b"from plain",
        message_id="plain-1",
        headers={"n": 7, "s": "str", "raw": bytearray(b"bytes"), "ok": True},
        timestamp=stamp,
    )
    await channel.default_exchange.publish(message, routing_key=topic)
    async with broker.consume(topic, prefetch=5, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert (d.id, d.body, d.attempt) == ("plain-1", b"from plain", 1)
        assert d.headers == {"n": "7", "s": "str", "raw": "bytes", "ok": "True"}
        assert abs(d.enqueued_at - int(stamp)) < 1
        await d.nack()  # the retry path keeps the id and counts the attempt
        (again,) = await take(sub, 1)
        assert (again.id, again.attempt, again.body) == ("plain-1", 2, b"from plain")
        assert again.headers["n"] == "7"
        assert abs(again.enqueued_at - int(stamp)) < 1
        await again.ack()


@pytest.mark.anyio
async def test_oncely_message_is_readable_by_plain_aio_pika(
    broker: AmqpBroker, plain: AbstractRobustConnection, topic: str
) -> None:
    mid = await broker.publish(topic, b"\x00binary\xff", headers={"tenant": "acme"})
    channel = await plain.channel()
    queue = await channel.get_queue(topic, ensure=False)
    message = await queue.get(timeout=5)
    assert message.body == b"\x00binary\xff"
    assert message.message_id == mid
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers["tenant"] == "acme"
    assert message.headers[Headers.MESSAGE_ID] == mid
    assert float(str(message.headers[Headers.PUBLISHED_AT])) == pytest.approx(time.time(), abs=30)
    await message.ack()


@pytest.mark.anyio
async def test_delays_round_up_to_buckets(broker: AmqpBroker, topic: str) -> None:
    t0 = time.monotonic()
    await broker.publish(topic, b"later", delay=0.3)  # 1 s bucket
    async with broker.consume(topic, prefetch=5, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert time.monotonic() - t0 >= 0.95
        assert d.attempt == 1
        t1 = time.monotonic()
        await d.nack(delay=1.2)  # 5 s bucket: never sooner than asked
        await nothing_within(sub, 1.3)
        (again,) = await take(sub, 1, within=15)
        assert time.monotonic() - t1 >= 4.9
        assert (again.id, again.attempt) == (d.id, 2)
        await again.ack()


@pytest.mark.anyio
async def test_a_nack_or_reject_that_cannot_republish_requeues_the_delivery(
    broker: AmqpBroker, plain: AbstractRobustConnection, topic: str
) -> None:
    """A failed republish (returned: its queue was deleted) or a delay no bucket holds still
    settles the delivery, with ``basic.nack(requeue=True)``: with prefetch 1 the message
    comes straight back, and a failed republish declares the topology again for the next."""
    ids = [await broker.publish(topic, b"%d" % i) for i in range(3)]
    channel = await plain.channel()
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert d.id == ids[0]
        await channel.queue_delete(bucket_name(topic, "1s"))
        with pytest.raises(PublishFailed) as failed:
            await d.nack(delay=0.5)
        assert "requeued" in "".join(getattr(failed.value, "__notes__", []))
        assert d.settled
        with pytest.raises(AlreadySettled):
            await d.ack()
        (again,) = await take(sub, 1)  # the only prefetch slot is free: it was settled
        assert (again.id, again.attempt) == (ids[0], 2)  # redelivered, counted
        await again.nack(delay=0.5)  # the bucket was declared again

        (d,) = await take(sub, 1)
        assert d.id == ids[1]
        await channel.queue_delete(dlq_name(topic))
        with pytest.raises(PublishFailed):
            await d.reject("poison")
        (again,) = await take(sub, 1)
        assert (again.id, again.attempt) == (ids[1], 2)
        await again.reject("poison")

        (d,) = await take(sub, 1)
        assert d.id == ids[2]
        with pytest.raises(NotSupported):
            await d.nack(delay=3601)
        (again,) = await take(sub, 1)
        assert (again.id, again.attempt) == (ids[2], 2)
        await again.ack()

        (late,) = await take(sub, 1, within=15)  # the one nacked through the 1 s bucket
        assert (late.id, late.attempt) == (ids[0], 3)
        await late.ack()
    (dead,) = await broker.dead_letters(topic)
    assert (dead.id, dead.reason) == (ids[1], "poison")


@pytest.mark.anyio
async def test_attempt_survives_the_retry_path(broker: AmqpBroker, topic: str) -> None:
    mid = await broker.publish(topic, b"retry me")
    seen = []
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        for _ in range(4):
            (d,) = await take(sub, 1)
            seen.append((d.id, d.attempt))
            await (d.nack() if d.attempt < 4 else d.ack())
    assert seen == [(mid, 1), (mid, 2), (mid, 3), (mid, 4)]


@pytest.mark.anyio
async def test_reject_dead_letters_with_reason_and_attempt(broker: AmqpBroker, topic: str) -> None:
    ids = [await broker.publish(topic, f"m{i}".encode(), headers={"i": str(i)}) for i in range(3)]
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        (first,) = await take(sub, 1)
        await first.nack()
        for _ in range(3):
            (d,) = await take(sub, 1)
            await d.reject(f"bad {d.body.decode()}")
    letters = await broker.dead_letters(topic)
    assert [dl.id for dl in letters] == ids[1:] + ids[:1]  # the retried one was rejected last
    by_id = {dl.id: dl for dl in letters}
    assert by_id[ids[0]].attempt == 2 and by_id[ids[1]].attempt == 1
    assert by_id[ids[0]].reason == "bad m0"
    assert by_id[ids[0]].headers["i"] == "0"
    assert by_id[ids[0]].failed_at == pytest.approx(time.time(), abs=30)
    # Reading does not remove or reorder.
    assert [dl.id for dl in await broker.dead_letters(topic)] == [dl.id for dl in letters]
    assert [dl.id for dl in await broker.dead_letters(topic, limit=1)] == [letters[0].id]

    assert await broker.replay(topic, ids=[ids[0]]) == 1
    assert [dl.id for dl in await broker.dead_letters(topic)] == ids[1:]
    async with broker.consume(topic, prefetch=1, visibility=30) as sub:
        (d,) = await take(sub, 1)
        assert (d.id, d.attempt, d.body) == (ids[0], 1, b"m0")
        assert Headers.REASON not in d.headers
        await d.ack()
    assert await broker.replay(topic) == 2
    assert await broker.dead_letters(topic) == []


@pytest.mark.anyio
async def test_replay_is_bounded_by_what_the_dlq_held_at_the_start(
    broker: AmqpBroker, topic: str
) -> None:
    """A consumer that dead-letters every message again while ``replay`` runs: the replay
    moves exactly the letters that were there when it started, each once, and ends."""
    n = 20
    ids = set(await asyncio.gather(*(broker.publish(topic, b"%d" % i) for i in range(n))))
    async with broker.consume(topic, prefetch=n, visibility=30) as sub:
        for d in await take(sub, n):
            await d.reject("first")
    rejected: list[str] = []

    async def reject_everything() -> None:
        async with AmqpBroker(AMQP_URL) as other:
            async with other.consume(topic, prefetch=4, visibility=30) as again:
                async for d in again:
                    await d.reject("again")
                    rejected.append(d.id)

    consumer = asyncio.create_task(reject_everything())
    try:
        moved = await asyncio.wait_for(broker.replay(topic), 60)
        assert moved == n
        await eventually(lambda: len(rejected) >= n, within=30)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    assert set(rejected) == ids  # the replayed ones ran, and went back to the DLQ
    letters = await broker.dead_letters(topic, limit=2 * n)
    assert sorted(dl.id for dl in letters) == sorted(ids)  # each once: none lost, none doubled
    assert {dl.reason for dl in letters} == {"again"}


@pytest.mark.anyio
async def test_plain_consumer_reject_lands_in_dlq(
    broker: AmqpBroker, plain: AbstractRobustConnection, topic: str
) -> None:
    mid = await broker.publish(topic, b"poison")
    channel = await plain.channel()
    queue = await channel.get_queue(topic, ensure=False)
    message = await queue.get(timeout=5)
    await message.reject(requeue=False)  # the work queue's native dead-lettering
    # basic.reject has no answer, and RabbitMQ routes the dead letter through the DLX on its
    # own time: a listing on another connection right after may come before it.
    deadline = time.monotonic() + 30
    while not (letters := await broker.dead_letters(topic)):
        assert time.monotonic() < deadline, "no dead letter listed within 30 s"
        await asyncio.sleep(0.05)
    (dl,) = letters
    assert (dl.id, dl.reason, dl.body) == (mid, "rejected", b"poison")


@pytest.mark.anyio
async def test_unroutable_publish_fails(
    broker: AmqpBroker, plain: AbstractRobustConnection, topic: str
) -> None:
    await broker.publish(topic, b"declares the topology")
    channel = await plain.channel()
    await channel.queue_delete(topic)  # now mandatory publishes to it are returned
    with pytest.raises(PublishFailed):
        await broker.publish(topic, b"returned")
    # The publish channel survives a returned message.
    other = topic + "-other"
    try:
        await broker.publish(other, b"fine")
    finally:
        await delete_topology(other)


@pytest.mark.anyio
async def test_prefetch_bounds_unsettled_deliveries(broker: AmqpBroker, topic: str) -> None:
    await asyncio.gather(*(broker.publish(topic, b"%d" % i) for i in range(10)))
    async with broker.consume(topic, prefetch=3, visibility=30) as sub:
        held = await take(sub, 3)
        await nothing_within(sub, 0.5)
        await held[1].ack()
        (fourth,) = await take(sub, 1)
        await nothing_within(sub, 0.3)
        for d in [held[0], held[2], fourth]:
            await d.ack()
        for _ in range(6):
            (d,) = await take(sub, 1)
            await d.ack()


@pytest.mark.anyio
async def test_batched_acks_never_ack_a_held_delivery(broker: AmqpBroker, topic: str) -> None:
    await asyncio.gather(*(broker.publish(topic, b"%d" % i) for i in range(40)))
    async with broker.consume(topic, prefetch=40, visibility=30) as sub:
        ds = await take(sub, 40)
        held = {ds[0].id, ds[17].id}
        await asyncio.gather(*(d.ack() for d in reversed(ds) if d.id not in held))
    await broker.aclose()  # the two held deliveries go back to the queue
    async with AmqpBroker(AMQP_URL) as b2, b2.consume(topic, prefetch=40, visibility=30) as sub:
        again = await take(sub, 2)
        assert {d.id for d in again} == held
        assert all(d.attempt == 2 for d in again)  # redelivered counts
        await nothing_within(sub, 0.5)
        for d in again:
            await d.ack()


@pytest.mark.anyio
async def test_aclose_returns_buffered_and_keeps_yielded_valid(
    broker: AmqpBroker, topic: str
) -> None:
    await asyncio.gather(*(broker.publish(topic, b"%d" % i) for i in range(5)))
    sub = broker.consume(topic, prefetch=5, visibility=30)
    (first,) = await take(sub, 1)
    await eventually(lambda: sub._buffer.qsize() == 4)  # the other four wait in the buffer
    await sub.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(sub)
    await first.ack()  # still valid after aclose
    async with broker.consume(topic, prefetch=5, visibility=30) as sub2:
        rest = await take(sub2, 4)
        assert first.id not in {d.id for d in rest}
        for d in rest:
            await d.ack()


@pytest.mark.anyio
async def test_broker_aclose_ends_subscriptions(topic: str) -> None:
    b = AmqpBroker(AMQP_URL)
    await b.publish(topic, b"x")
    sub = b.consume(topic, prefetch=2, visibility=30)
    (d,) = await take(sub, 1)
    waiter = asyncio.ensure_future(anext(sub))
    await b.aclose()
    with pytest.raises(StopAsyncIteration):
        await waiter
    with pytest.raises(DeliveryExpired):
        await d.ack()
    await sub.aclose()
    await b.aclose()  # idempotent


@pytest.mark.anyio
async def test_concurrent_publishes_pipeline(broker: AmqpBroker, topic: str) -> None:
    await broker.publish(topic, b"warm up")
    assert broker._pub is not None
    channel: Any = await broker._pub.get_underlay_channel()
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(channel.confirmations))
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(broker.publish(topic, b"x" * 100) for _ in range(300)))
    finally:
        sampler.cancel()
    assert peak > 10, f"publishes did not overlap (peak {peak} confirms in flight)"


@pytest.mark.anyio
async def test_connection_loss_expires_deliveries_and_resumes(topic: str) -> None:
    name = f"oncely-test-{topic}"
    async with AmqpBroker(f"{AMQP_URL}?name={name}") as b:
        mid = await b.publish(topic, b"survives")
        async with b.consume(topic, prefetch=5, visibility=30) as sub:
            (d,) = await take(sub, 1)
            assert d.attempt == 1
            assert isinstance(d, AmqpDelivery)
            assert await asyncio.to_thread(close_connections_named, name) == 1
            await eventually(lambda: d._window.closed)  # the client has seen the close
            with pytest.raises(DeliveryExpired):
                await d.ack()
            with pytest.raises(DeliveryExpired):
                await d.nack()
            (again,) = await take(sub, 1, within=30)  # same subscription, new channel
            assert (again.id, again.attempt) == (mid, 2)
            assert await on_the_fast_path(sub)  # taken over again after the reconnect
            await again.ack()
            # The publish side recovered too.
            await b.publish(topic, b"after")
            (after,) = await take(sub, 1)
            await after.ack()


@pytest.mark.anyio
async def test_quorum_queue_option(plain: AbstractRobustConnection, topic: str) -> None:
    async with AmqpBroker(f"{AMQP_URL}?queue_type=quorum") as b:
        mid = await b.publish(topic, b"replicated")
        # Redeclaring with the quorum arguments is accepted, with the classic ones refused.
        channel = await plain.channel()
        await channel.declare_queue(topic, durable=True, arguments=topology(topic, "quorum")[0][1])
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(
                topic, durable=True, arguments=topology(topic, "classic")[0][1]
            )
        async with b.consume(topic, prefetch=2, visibility=30) as sub:
            (d,) = await take(sub, 1)
            assert (d.id, d.attempt) == (mid, 1)
            await d.nack(delay=0.5)
            (d,) = await take(sub, 1, within=15)
            assert (d.id, d.attempt) == (mid, 2)
            await d.reject("quorum dlq")
        (dl,) = await b.dead_letters(topic)
        assert (dl.id, dl.reason, dl.attempt) == (mid, "quorum dlq", 2)
        assert await b.replay(topic) == 1


@pytest.mark.anyio
async def test_conflicting_existing_queue_is_a_config_error(
    plain: AbstractRobustConnection, topic: str
) -> None:
    channel = await plain.channel()
    await channel.declare_queue(topic, durable=False)
    async with AmqpBroker(AMQP_URL) as b:
        with pytest.raises(ConfigError):
            await b.publish(topic, b"x")


def test_topic_names_are_checked() -> None:
    b = AmqpBroker(AMQP_URL)
    for bad in ("", "amq.reserved", "x" * 250):
        with pytest.raises(ConfigError):
            b.consume(bad, prefetch=1, visibility=1)


def test_topology_names() -> None:
    names = [name for name, _ in topology("orders", "classic")]
    assert names[:2] == ["orders", dlq_name("orders")]
    assert names[2:] == [bucket_name("orders", label) for _, label in BUCKETS]
    bucket_args = dict(topology("orders", "quorum"))[bucket_name("orders", "5s")]
    assert bucket_args["x-message-ttl"] == 5000
    assert bucket_args["x-dead-letter-routing-key"] == "orders"


def test_consumer_timeout_follows_visibility_but_never_shortens_the_default() -> None:
    assert consumer_timeout_ms(30) == 1_800_000
    assert consumer_timeout_ms(2 * 3600) == 4 * 3600 * 1000


@pytest.mark.anyio
async def test_consumer_carries_its_timeout(broker: AmqpBroker, topic: str) -> None:
    """The consumer is registered with x-consumer-timeout (ignored by servers before 3.11.15,
    which apply the global one that scripts/services.sh sets to 1 hour)."""
    await broker.publish(topic, b"x")
    async with broker.consume(topic, prefetch=1, visibility=3600) as sub:
        (delivery,) = await take(sub, 1)
        out = rabbitmqctl("list_consumers", "queue_name", "arguments")
        line = next(ln for ln in out.splitlines() if ln.startswith(topic + "\t"))
        assert "x-consumer-timeout" in line and "7200000" in line
        await delivery.ack()
