"""What the conformance suite does not cover for ``memory://``: URLs, hubs, id dedupe."""

from __future__ import annotations

import time

import anyio
import pytest

from oncely.brokers.base import Broker, Delivery, Subscription
from oncely.brokers.memory import MemoryBroker
from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, ConnectionLost, DeliveryExpired

LONG = 60.0


async def next_within(sub: Subscription, seconds: float = 2.0) -> Delivery:
    with anyio.fail_after(seconds):
        return await sub.__anext__()


async def assert_quiet(sub: Subscription, seconds: float = 0.1) -> None:
    with anyio.move_on_after(seconds):
        d = await sub.__anext__()
        pytest.fail(f"unexpected delivery {d.id}")


def test_from_url_picks_the_hub() -> None:
    assert MemoryBroker.from_url("memory://").url == "memory://"
    assert MemoryBroker.from_url("memory://jobs").url == "memory://jobs"
    assert MemoryBroker.from_url("memory://jobs/").url == "memory://jobs"
    assert isinstance(broker_from_url("memory://jobs"), MemoryBroker)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://jobs?size=3", "memory URLs take no options"),
        ("memory://jobs/sub", "with no path"),
        ("memory://jobs#frag", "with no path"),
        ("memory://user:pw@jobs", "cannot hold credentials or a port"),
        ("memory://jobs:5672", "cannot hold credentials or a port"),
        ("sqlite:///x.db", "not a memory URL"),
    ],
)
def test_from_url_rejects_what_it_cannot_honour(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MemoryBroker.from_url(url)


def test_constructor_does_no_io() -> None:
    broker = MemoryBroker("never-connected")
    assert broker.capabilities.durable is False
    assert broker.capabilities.extend and broker.capabilities.native_delay


@pytest.mark.anyio
async def test_brokers_share_a_named_hub_and_not_a_private_one(unique: str) -> None:
    async with MemoryBroker(unique) as a, MemoryBroker(unique) as b:
        mid = await a.publish("t", b"shared")
        async with b.consume("t", prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            assert d.id == mid
            await d.ack()
    async with MemoryBroker() as c, MemoryBroker() as d2, MemoryBroker(f"{unique}-x") as e:
        await c.publish("t", b"private")
        for other in (d2, e):
            async with other.consume("t", prefetch=1, visibility=LONG) as sub:
                await assert_quiet(sub)


@pytest.mark.anyio
async def test_the_default_hub_is_shared(unique: str) -> None:
    a, b = broker_from_url("memory://"), broker_from_url("memory://")
    async with a, b:
        mid = await a.publish(unique, b"x")
        async with b.consume(unique, prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            assert d.id == mid
            await d.ack()


@pytest.mark.anyio
async def test_a_queued_message_id_is_not_enqueued_twice(unique: str) -> None:
    async with MemoryBroker(unique) as broker:
        assert await broker.publish("t", b"one", message_id="m") == "m"
        assert await broker.publish("t", b"two", message_id="m") == "m"
        assert await broker.publish("other", b"three", message_id="m") == "m"
        async with broker.consume("t", prefetch=5, visibility=LONG) as sub:
            d = await next_within(sub)
            assert d.body == b"one"
            # While in flight the id is still taken; once acked it may be used again.
            await broker.publish("t", b"dup", message_id="m")
            await assert_quiet(sub)
            await d.ack()
            await broker.publish("t", b"after ack", message_id="m")
            again = await next_within(sub)
            assert (again.id, again.body, again.attempt) == ("m", b"after ack", 1)
            await again.ack()
        async with broker.consume("other", prefetch=5, visibility=LONG) as sub:
            assert (await next_within(sub)).body == b"three"


@pytest.mark.anyio
async def test_use_before_connect_and_after_close_is_connection_lost(unique: str) -> None:
    broker = MemoryBroker(unique)
    with pytest.raises(ConnectionLost, match="not connected"):
        await broker.publish("t", b"x")
    with pytest.raises(ConnectionLost):
        await broker.consume("t", prefetch=1, visibility=1).__anext__()
    await broker.connect()
    await broker.connect()
    await broker.publish("t", b"x")
    sub = broker.consume("t", prefetch=1, visibility=LONG)
    d = await next_within(sub)
    await broker.aclose()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()
    with pytest.raises(ConnectionLost):
        await d.ack()


@pytest.mark.anyio
async def test_invalid_arguments_are_value_errors() -> None:
    async with MemoryBroker() as broker:
        with pytest.raises(ValueError, match="prefetch"):
            broker.consume("t", prefetch=0, visibility=1)
        with pytest.raises(ValueError, match="visibility"):
            broker.consume("t", prefetch=1, visibility=0)
        with pytest.raises(ValueError, match="delay"):
            await broker.publish("t", b"x", delay=-1)
        await broker.publish("t", b"x")
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            with pytest.raises(ValueError, match="delay"):
                await d.nack(delay=-0.5)
            with pytest.raises(ValueError, match="seconds"):
                await d.extend(-1)
            await d.ack()


@pytest.mark.anyio
async def test_extend_to_zero_hands_the_message_over_at_once() -> None:
    async with MemoryBroker() as broker:
        await broker.publish("t", b"x")
        holder = broker.consume("t", prefetch=1, visibility=LONG)
        mine = await next_within(holder)
        async with broker.consume("t", prefetch=1, visibility=LONG) as waiting:
            with anyio.fail_after(2):
                async with anyio.create_task_group() as tg:
                    got: list[Delivery] = []

                    async def take() -> None:
                        got.append(await waiting.__anext__())

                    tg.start_soon(take)
                    await anyio.wait_all_tasks_blocked()
                    # The waiter sleeps until the old deadline a minute away; moving the deadline
                    # up must wake it rather than leave the message idle.
                    await mine.extend(0)
            assert got[0].id == mine.id and got[0].attempt == 2
            with pytest.raises(DeliveryExpired):
                await mine.ack()
            await got[0].ack()
        await holder.aclose()


@pytest.mark.anyio
async def test_consumer_sleeps_until_the_earliest_delay_not_a_poll() -> None:
    async with MemoryBroker() as broker:
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            start = time.monotonic()
            await broker.publish("t", b"late", delay=0.3)
            d = await next_within(sub)
            elapsed = time.monotonic() - start
            assert 0.29 <= elapsed < 1.0
            await d.ack()


@pytest.mark.anyio
async def test_replay_leaves_a_dead_letter_whose_id_is_queued_again() -> None:
    async with MemoryBroker() as broker:
        await broker.publish("t", b"v1", message_id="m")
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            await d.reject("bad")
            await broker.publish("t", b"v2", message_id="m")
            assert await broker.replay("t") == 0
            assert [x.body for x in await broker.dead_letters("t")] == [b"v1"]
            d = await next_within(sub)
            assert d.body == b"v2"
            await d.ack()
            assert await broker.replay("t", ids=["other"]) == 0
            assert await broker.replay("t", ids=["m"]) == 1
            d = await next_within(sub)
            assert (d.body, d.attempt) == (b"v1", 1)
            await d.ack()
        assert await broker.dead_letters("nothing-here") == []
        assert await broker.replay("nothing-here") == 0


@pytest.mark.anyio
async def test_many_extends_do_not_leak_heap_entries() -> None:
    broker: Broker = MemoryBroker()
    async with broker:
        await broker.publish("t", b"x")
        async with broker.consume("t", prefetch=1, visibility=LONG) as sub:
            d = await next_within(sub)
            for _ in range(1000):
                await d.extend(LONG)
            await d.ack()
            await assert_quiet(sub)
        assert isinstance(broker, MemoryBroker) and broker._hub is not None
        # The wait above looked at the heap top, which drops every stale entry.
        assert broker._hub.topics["t"].heap == []


@pytest.mark.anyio
async def test_a_failed_settle_frees_its_prefetch_slot() -> None:
    """A settle that raises must not keep its slot: with prefetch 1, one such failure would
    otherwise park the subscription for ever. The message itself comes back once its
    visibility runs out."""
    async with MemoryBroker() as broker:
        first = await broker.publish("t", b"first")
        second = await broker.publish("t", b"second")
        async with broker.consume("t", prefetch=1, visibility=0.3) as sub:
            d = await next_within(sub)
            assert d.id == first
            for bad in (-1.0, float("nan")):
                with pytest.raises(ValueError, match="delay"):
                    await d.nack(delay=bad)
            assert not d.settled
            other = await next_within(sub)  # the slot was given back
            assert other.id == second
            await other.ack()
            again = await next_within(sub)  # after the visibility of the failed one
            assert (again.id, again.attempt) == (first, 2)
            await again.ack()
            with pytest.raises(DeliveryExpired):
                await d.ack()  # its lease is gone; the slot is not freed twice
            await broker.publish("t", b"third")
            third = await next_within(sub)
            assert third.body == b"third"
            await third.ack()
            assert sub.unsettled == 0  # type: ignore[attr-defined]
