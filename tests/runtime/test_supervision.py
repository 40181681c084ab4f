"""Nothing dies silently: heartbeats, consume loops and settle paths under failing backends.

The backends are the real memory broker and store, wrapped to raise the way a third-party
adapter might (``tests/runtime/_faulty.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import oncely
from oncely.brokers.memory import MemoryBroker
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from tests._wait import eventually
from tests.runtime._faulty import FaultyStore, WrappedBroker

pytestmark = pytest.mark.anyio


async def test_a_failing_beat_affects_only_its_own_delivery(unique: str) -> None:
    def bad_extend(delivery: oncely.Delivery) -> None:
        if delivery.key == "bad":
            raise RuntimeError("third-party extend glitch")

    acked: list[str] = []
    broker = WrappedBroker(
        MemoryBroker(unique), on_extend=bad_extend, on_ack=lambda d: acked.append(d.key)
    )
    store = FaultyStore()
    store.renew_error = lambda key: RuntimeError("renew glitch") if key.endswith(":bad") else None
    app = oncely.App()
    release = asyncio.Event()
    runs: list[str] = []

    @app.handler("t", name="beat", idempotent=True, visibility=0.3, concurrency=2, timeout=30)
    async def handle(job: dict[str, str]) -> None:
        runs.append(job["id"])
        await release.wait()

    async with oncely.Worker(app, broker=broker, store=store) as worker:
        ids = {k: await app.publish("t", {"id": k}, key=k) for k in ("bad", "good")}
        # Both keep being beaten, several times over: the glitches end neither the heartbeat
        # nor the other delivery's extensions and renewals.
        await eventually(
            lambda: (
                broker.extends.get(ids["good"], 0) >= 4
                and broker.extends.get(ids["bad"], 0) >= 4
                and store.renewals.get("beat:good", 0) >= 4
                and store.renewals.get("beat:bad", 0) >= 4
            )
        )
        assert worker.stats.heartbeat_errors >= 6  # bad's extend and renew, every beat
        assert runs.count("good") == 1
        release.set()
        # "bad" lost its visibility and lease (its own beats failed), so it may legitimately
        # come back; "good" was kept alive throughout and ran once.
        await eventually(lambda: "good" in acked)
    assert runs.count("good") == 1


async def test_the_heartbeat_task_is_restarted_if_it_dies(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    stats = Stats()
    beats: list[int] = []

    class Brittle(Heartbeat):
        async def _beat(self, active: Active) -> None:
            beats.append(1)
            if len(beats) == 1:
                raise RuntimeError("a bug in the beat itself")

    broker = MemoryBroker(unique)
    async with broker, broker.consume("t", prefetch=1, visibility=5) as sub:
        await broker.publish("t", b"{}")
        delivery = await sub.__anext__()
        heartbeat = Brittle("h", 0.06, extend=True, store=None, stats=stats)
        heartbeat.track(Active(delivery, None))
        await eventually(lambda: len(beats) >= 3)
        await heartbeat.aclose()
        await delivery.ack()
    assert stats.heartbeat_errors == 1
    assert any("heartbeat died" in r.message and r.exc_info for r in caplog.records)


async def test_consume_value_error_stops_the_worker_loudly(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> None:
        raise ValueError("visibility must be > 0, got -1")

    app = oncely.App()

    @app.handler("t")
    async def handle(_: Any) -> None: ...

    worker = oncely.Worker(app, broker=WrappedBroker(MemoryBroker(unique), on_consume=refuse))
    await worker.start()
    with pytest.raises(oncely.WorkerFailed, match="visibility must be > 0"):
        await asyncio.wait_for(worker.wait_stopped(), 10)
    assert isinstance(worker.failure, ValueError)
    assert any(r.levelno == logging.CRITICAL and r.exc_info for r in caplog.records)


async def test_an_unexpected_consume_error_is_logged_and_the_loop_restarted(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [RuntimeError("driver hiccup")]

    def hiccup() -> None:
        if failures:
            raise failures.pop()

    app = oncely.App()
    seen: list[int] = []

    @app.handler("t")
    async def handle(job: dict[str, int]) -> None:
        seen.append(job["n"])

    broker = WrappedBroker(MemoryBroker(unique), on_next=hiccup)
    async with oncely.Worker(app, broker=broker) as worker:
        await app.publish("t", {"n": 1})
        await eventually(lambda: seen == [1])
        assert worker.failure is None and worker.stats.consume_errors == 1
    assert any(
        "failed unexpectedly" in r.message and r.exc_info and r.exc_info[0] is RuntimeError
        for r in caplog.records
    )


async def test_the_same_unexpected_consume_error_again_and_again_stops_the_worker(
    unique: str,
) -> None:
    def always() -> None:
        raise RuntimeError("driver broken for good")

    app = oncely.App()

    @app.handler("t")
    async def handle(_: Any) -> None: ...

    worker = oncely.Worker(app, broker=WrappedBroker(MemoryBroker(unique), on_next=always))
    await worker.start()
    with pytest.raises(oncely.WorkerFailed, match="driver broken for good"):
        await asyncio.wait_for(worker.wait_stopped(), 20)
    assert worker.stats.consume_errors == 5


async def test_a_third_party_ack_error_is_logged_and_the_worker_goes_on(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    def flaky_ack(delivery: oncely.Delivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("ack glitch")

    app = oncely.App()
    runs: list[int] = []

    # Room for the redeliveries: a delivery whose ack failed may keep its prefetch slot in
    # the adapter until its visibility runs out (the adapter's business, not the runtime's).
    @app.handler("t", concurrency=4, visibility=0.3)
    async def handle(job: dict[str, int]) -> None:
        runs.append(job["n"])

    broker = WrappedBroker(MemoryBroker(unique), on_ack=flaky_ack)
    async with oncely.Worker(app, broker=broker) as worker:
        for n in range(3):
            await app.publish("t", {"n": n})
        # Every first ack fails; the deliveries come back when visibility runs out.
        await eventually(lambda: worker.stats.processed == 3)
    assert worker.stats.settle_errors == 3
    assert sorted(runs) == [0, 0, 1, 1, 2, 2]
    assert any("ack of" in r.message and r.exc_info for r in caplog.records)


async def test_at_most_once_cancelled_at_shutdown_is_counted_and_logged(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = oncely.App()
    started = asyncio.Event()

    @app.handler("t", guarantee="at_most_once")
    async def handle(_: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    await worker.start()
    message_id = await app.publish("t", {})
    await started.wait()
    await worker.stop(grace=0.05)
    assert worker.stats.lost == 1 and worker.stats.cancelled == 0
    (record,) = [r for r in caplog.records if "lost" in r.message]
    assert record.levelno == logging.WARNING and message_id in record.message


async def test_a_second_stop_with_less_grace_cuts_the_drain_short(unique: str) -> None:
    app = oncely.App()
    started = asyncio.Event()

    @app.handler("t", idempotent=True)
    async def handle(_: Any) -> None:
        started.set()
        await asyncio.sleep(60)

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    await worker.start()
    await app.publish("t", {}, key="k")
    await started.wait()
    first = asyncio.create_task(worker.stop(grace=30))
    await eventually(lambda: worker._stopping is not None and worker._stopping.is_set())
    await asyncio.wait_for(worker.stop(grace=0), 5)  # without the fix: waits out the 30 s
    await first
    assert worker.stats.cancelled == 1 and worker.stats.processed == 0


async def test_a_hanging_beat_does_not_hold_up_the_others(unique: str) -> None:
    hang = asyncio.Event()

    class HangingStore(FaultyStore):
        async def renew(self, key: str, token: str, lease: float) -> None:
            if key.endswith(":stuck"):
                await hang.wait()  # a backend call that never returns
            await super().renew(key, token, lease)

    store = HangingStore()
    broker = WrappedBroker(MemoryBroker(unique))
    app = oncely.App()
    release = asyncio.Event()

    @app.handler("t", name="h", idempotent=True, visibility=0.3, concurrency=2)
    async def handle(_: Any) -> None:
        await release.wait()

    async with oncely.Worker(app, broker=broker, store=store) as worker:
        ids = {k: await app.publish("t", {}, key=k) for k in ("stuck", "fine")}
        await eventually(lambda: store.renewals.get("h:fine", 0) >= 4)
        assert broker.extends.get(ids["fine"], 0) >= 4
        assert worker.stats.heartbeat_errors >= 3  # the stuck renewals, each timed out
        release.set()
        hang.set()
        await eventually(lambda: worker.stats.processed == 2)
