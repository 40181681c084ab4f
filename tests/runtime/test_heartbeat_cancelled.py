"""A heartbeat whose beat meets a ``CancelledError`` nobody asked for (a backend that cancels
futures its callers wait on, as a store's batch task does when it is cut off) keeps beating,
and says so: before, the error ended the heartbeat's task as "cancelled", which its supervisor
took for a close, so it neither logged nor restarted it. Every running delivery of the handler
then went unextended and its lease unrenewed, without a word."""

from __future__ import annotations

import asyncio
import logging

import pytest

from oncely.brokers.base import Delivery
from oncely.brokers.memory import MemoryBroker
from oncely.errors import NotSupported
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from tests._wait import eventually
from tests.runtime._faulty import FaultyStore, WrappedBroker

pytestmark = pytest.mark.anyio


async def test_a_beat_cancelled_inside_the_store_is_logged_and_beating_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FaultyStore()
    stats = Stats()
    heartbeat = Heartbeat("h", 0.3, extend=True, store=store, stats=stats)
    first = [True]

    def renew_error(_: str) -> BaseException | None:
        if first[0]:
            first[0] = False
            return asyncio.CancelledError()
        return None

    store.renew_error = renew_error
    await store.connect()
    begin = await store.begin("h:k", "fp", 30.0)
    assert begin.token is not None
    async with MemoryBroker() as broker:
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=1, visibility=30)
        delivery = await anext(sub)
        stop = asyncio.Event()
        task = asyncio.create_task(stop.wait())
        active = Active(delivery, task, lease_key="h:k", lease_token=begin.token)
        heartbeat.track(active)
        try:
            with caplog.at_level(logging.WARNING, "oncely.worker"):
                await eventually(lambda: store.renewals.get("h:k", 0) >= 3)
        finally:
            heartbeat.untrack(active)
            stop.set()
            await task
            await heartbeat.aclose()
            await sub.aclose()
            await store.aclose()
    assert stats.heartbeat_errors == 1
    assert "could not renew lease h:k" in caplog.text
    assert not active.lease_lost and not task.cancelled()


async def test_a_heartbeat_task_cancelled_from_outside_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = Stats()
    heartbeat = Heartbeat("h", 0.3, extend=True, store=None, stats=stats)
    async with MemoryBroker() as broker:
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=1, visibility=30)
        delivery = await anext(sub)
        active = Active(delivery, None)
        heartbeat.track(active)
        try:
            dead = heartbeat._task
            assert dead is not None
            with caplog.at_level(logging.ERROR, "oncely.worker"):
                dead.cancel()
                await asyncio.gather(dead, return_exceptions=True)
                await eventually(lambda: stats.extensions >= 2)
        finally:
            heartbeat.untrack(active)
            await heartbeat.aclose()
            await sub.aclose()
    assert heartbeat._task is None or heartbeat._task is not dead
    assert "heartbeat died; restarting it" in caplog.text
    assert stats.heartbeat_errors == 1


async def test_a_broker_refusing_extend_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A broker that declares ``extend`` but refuses it (``NotSupported``) turns extension
    off for the whole handler: every running delivery may then be redelivered meanwhile. It
    happened without a word."""

    def refuse(_: Delivery) -> None:
        raise NotSupported("not on this queue")

    stats = Stats()
    heartbeat = Heartbeat("h", 0.3, extend=True, store=None, stats=stats)
    async with WrappedBroker(MemoryBroker(), on_extend=refuse) as broker:
        await broker.publish("t", b"{}")
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=2, visibility=30)
        actives = [Active(await anext(sub), None), Active(await anext(sub), None)]
        for active in actives:
            heartbeat.track(active)
        try:
            with caplog.at_level(logging.WARNING, "oncely.worker"):
                await eventually(lambda: not heartbeat.extend)
        finally:
            for active in actives:
                heartbeat.untrack(active)
            await heartbeat.aclose()
            await sub.aclose()
    said = [r for r in caplog.records if "cannot extend visibility" in r.getMessage()]
    assert len(said) == 1 and "not on this queue" in said[0].getMessage()
