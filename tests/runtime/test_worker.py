"""The runtime's promises, on the in-process broker and store."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.stores.memory import MemoryStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str
    qty: int


async def dead_letters(worker: oncely.Worker, topic: str) -> list[oncely.DeadLetter]:
    assert isinstance(worker.broker, DeadLetterAdmin)
    return await worker.broker.dead_letters(topic)


FAST = oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.02)


async def test_typed_payloads_poison_and_keep_running(unique: str) -> None:
    app = oncely.App()
    seen: list[Order] = []

    @app.handler("orders", retry=FAST)
    async def handle(order: Order) -> None:
        seen.append(order)

    url = f"memory://{unique}"
    async with oncely.Worker(app, broker=url) as worker:
        await app.publish("orders", Order(id="a", qty=1))
        await app.publish("orders", b'{"id": "b", "qty": "two"}')
        await app.publish("orders", b"not json")
        await app.publish("orders", Order(id="c", qty=3))
        await eventually(lambda: worker.stats.processed == 2 and worker.stats.dead_lettered == 2)
        letters = await dead_letters(worker, "orders")
    assert [o.id for o in seen] == ["a", "c"] or sorted(o.id for o in seen) == ["a", "c"]
    reasons = sorted(d.reason for d in letters)
    assert all(r.startswith("undecodable payload") for r in reasons)
    assert any("$.qty" in r for r in reasons)


async def test_fails_twice_then_succeeds_and_exhaustion_dead_letters(unique: str) -> None:
    app = oncely.App()
    attempts: Counter[str] = Counter()

    @app.handler("jobs", retry=FAST)
    async def flaky(job: dict[str, Any], ctx: oncely.Context) -> None:
        attempts[job["id"]] += 1
        assert ctx.attempt == attempts[job["id"]]
        if job["id"] == "doomed" or ctx.attempt <= 2:
            raise RuntimeError(f"boom {ctx.attempt}")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("jobs", {"id": "ok"})
        await app.publish("jobs", {"id": "doomed"})
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "jobs")
    assert attempts == {"ok": 3, "doomed": 3}
    assert worker.stats.retried == 4
    assert letter.reason == "RuntimeError: boom 3 (gave up after 3 attempts)"
    assert letter.attempt == 3


async def test_retry_and_reject_instructions(unique: str) -> None:
    app = oncely.App()
    runs: list[float] = []

    @app.handler("a", retry=oncely.RetryPolicy(max_attempts=5))
    async def asks_for_delay(_: dict[str, int]) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise oncely.Retry(delay=0.3)

    @app.handler("b")
    async def refuses(_: dict[str, int]) -> None:
        raise oncely.Reject("customer is blocked")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("a", {})
        await app.publish("b", {})
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "b")
    assert runs[1] - runs[0] >= 0.3
    assert letter.reason == "customer is blocked" and letter.attempt == 1


async def test_timeout_is_a_failure(unique: str) -> None:
    app = oncely.App()

    @app.handler("slow", timeout=0.05, retry=oncely.RetryPolicy(max_attempts=2, base=0.01))
    async def slow(_: dict[str, int]) -> None:
        await asyncio.sleep(5)

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("slow", {})
        await eventually(lambda: worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "slow")
    assert letter.reason.startswith("HandlerTimeout: handler ran past its 0.05s timeout")
    assert worker.stats.retried == 1


async def test_heartbeat_keeps_a_long_handler_invisible(unique: str) -> None:
    app = oncely.App()
    runs = 0

    # Windows of 1.5 s, not tenths: a beat comes every 0.5 s, so a stall of the test
    # process under 1 s (a loaded CI machine) must not look like a lost heartbeat. The
    # default concurrency matters: with a free slot the broker takes the message again as
    # soon as its visibility runs out, which is what a missing heartbeat would let happen.
    @app.handler("long", visibility=1.5, timeout=10)
    async def long(_: dict[str, int]) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(4.0)  # past two and a half visibility windows

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("long", {})
        await eventually(lambda: worker.stats.processed == 1)
    assert runs == 1 and worker.stats.received == 1


async def test_concurrency_limit_is_respected(unique: str) -> None:
    app = oncely.App()
    running = peak = done = 0
    release = asyncio.Event()

    @app.handler("work", concurrency=3)
    async def work(_: dict[str, int]) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done += 1

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for n in range(10):
            await app.publish("work", {"n": n})
        await eventually(lambda: running == 3)
        assert worker.in_flight == 3
        release.set()
        await eventually(lambda: done == 10)
    assert peak == 3


async def test_effectively_once_absorbs_duplicates_and_catches_mismatch(unique: str) -> None:
    app = oncely.App(idempotent=True)
    effects: Counter[str] = Counter()

    @app.handler("pay", concurrency=8)
    async def pay(p: dict[str, int]) -> dict[str, str]:
        effects[str(p["n"])] += 1
        await asyncio.sleep(0.02)
        return {"charged": str(p["n"])}

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for _ in range(3):
            for n in range(5):
                await app.publish("pay", {"n": n}, key=f"k{n}")
        await app.publish("pay", {"n": 99}, key="k0")  # same key, different body
        await eventually(
            lambda: (
                worker.stats.processed + worker.stats.duplicates == 15
                and worker.stats.dead_lettered == 1
            )
        )
        (letter,) = await dead_letters(worker, "pay")
    assert effects == {str(n): 1 for n in range(5)}
    assert worker.stats.duplicates == 10
    assert "reused with a different payload" in letter.reason


async def test_missing_key_policy(unique: str) -> None:
    app = oncely.App()

    @app.handler("strict", idempotent=True, key="header:x-request-id", on_missing_key="reject")
    async def strict(_: dict[str, int]) -> None:
        return None

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("strict", {}, headers={"x-request-id": "r1"})
        await app.publish("strict", {})
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "strict")
    assert letter.reason == "message has no idempotency key"


async def test_failing_key_function_dead_letters(unique: str) -> None:
    app = oncely.App()

    @app.handler("k", idempotent=True, key=lambda p, d: p["id"].upper())
    async def handle(_: dict[str, Any]) -> None:
        return None

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("k", {"id": "a"})
        await app.publish("k", {"no_id": 1})
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "k")
    assert letter.reason == "key extraction failed: KeyError('id')"


async def test_unencodable_result_is_not_a_failure(unique: str) -> None:
    app = oncely.App(idempotent=True)
    runs = 0

    @app.handler("r")
    async def handle(_: dict[str, Any]) -> object:
        nonlocal runs
        runs += 1
        return object()  # msgspec cannot encode this

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("r", {}, key="once")
        await app.publish("r", {}, key="once")
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.duplicates == 1)
    assert runs == 1 and worker.stats.retried == 0


async def test_at_most_once_acks_first_and_never_retries(unique: str) -> None:
    app = oncely.App()
    runs = 0

    @app.handler("metrics", guarantee="at_most_once")
    async def metrics(_: dict[str, int]) -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("dropped")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("metrics", {})
        await app.publish("metrics", b"[not json")
        await eventually(lambda: worker.stats.failed == 1 and worker.stats.dead_lettered == 1)
        (letter,) = await dead_letters(worker, "metrics")
    assert runs == 1 and worker.stats.retried == 0
    assert letter.reason.startswith("undecodable payload")


class FlakyStore(MemoryStore):
    """A real memory store that can be switched off, to test the runtime's store policy."""

    down = True

    async def begin(self, key: str, fingerprint: str, lease: float) -> oncely.Begin:
        if self.down:
            raise oncely.StoreUnavailable("store is down")
        return await super().begin(key, fingerprint, lease)


@pytest.mark.parametrize("fail_open", [False, True])
async def test_store_unreachable_fails_closed_by_default(unique: str, fail_open: bool) -> None:
    app = oncely.App()
    runs = 0

    @app.handler("t", idempotent=True, retry=oncely.RetryPolicy(max_attempts=50, base=0.01))
    async def handle(_: dict[str, int]) -> None:
        nonlocal runs
        runs += 1

    store = FlakyStore()
    settings = oncely.Settings(fail_open=fail_open)
    async with oncely.Worker(app, broker=f"memory://{unique}", store=store, settings=settings) as w:
        await app.publish("t", {})
        if fail_open:
            await eventually(lambda: w.stats.processed == 1)
        else:
            await eventually(lambda: w.stats.deferred >= 2)
            assert runs == 0
            store.down = False
            await eventually(lambda: w.stats.processed == 1)
    assert runs == 1


async def test_graceful_stop_drains_and_gives_back_what_outlives_grace(unique: str) -> None:
    app = oncely.App()
    started = asyncio.Event()
    finished: list[str] = []

    @app.handler("quick", concurrency=1)
    async def quick(_: dict[str, int]) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append("quick")

    @app.handler("stuck", concurrency=1)
    async def stuck(_: dict[str, int]) -> None:
        await asyncio.sleep(60)

    url = f"memory://{unique}"
    worker = oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.5))
    await worker.start()
    await app.publish("quick", {})
    await app.publish("stuck", {})
    await started.wait()
    await eventually(lambda: worker.in_flight == 2)
    await worker.stop()
    assert finished == ["quick"]
    assert worker.stats.processed == 1 and worker.stats.cancelled == 1
    # The stuck message was nacked, not acked: a fresh consumer gets it at once, and the
    # give-back was a deferral (the handler did not finish), so the attempt is unchanged.
    broker = oncely.broker_from_url(url)
    async with broker, broker.consume("stuck", prefetch=1, visibility=5) as sub:
        again = await asyncio.wait_for(sub.__anext__(), 2)
        assert again.attempt == 1
        await again.ack()


async def test_a_second_stop_gives_up_on_a_handler_that_swallows_its_cancel(unique: str) -> None:
    app = oncely.App()
    swallowed = asyncio.Event()
    release = asyncio.Event()

    @app.handler("stubborn", concurrency=1, visibility=0.5)
    async def stubborn(_: dict[str, int]) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                swallowed.set()  # and runs on: a handler bug

    @app.handler("stuck", concurrency=1)
    async def stuck(_: dict[str, int]) -> None:
        await asyncio.sleep(60)

    url = f"memory://{unique}"
    worker = oncely.Worker(app, broker=url, settings=oncely.Settings(grace_period=0.2))
    await worker.start()
    await app.publish("stubborn", {})
    await app.publish("stuck", {})
    await eventually(lambda: worker.in_flight == 2)
    first = asyncio.create_task(worker.stop())
    try:
        await asyncio.wait_for(swallowed.wait(), 10)
        await eventually(lambda: worker.stats.cancelled == 1)  # the other one gave back
        assert not first.done() and worker.state == "draining"
        # Before, no later stop() (no second signal) could end this: stop() waited for ever.
        await asyncio.wait_for(worker.stop(0.0), 10)
        await asyncio.wait_for(first, 10)
        assert worker.state == "stopped"
        (task,) = worker.abandoned
        assert task.get_name().endswith("stubborn")
        # Never acked: its visibility, no longer extended, runs out and it comes back.
        broker = oncely.broker_from_url(url)
        async with broker, broker.consume("stubborn", prefetch=1, visibility=5) as sub:
            again = await asyncio.wait_for(sub.__anext__(), 10)
            assert again.attempt == 2
            await again.ack()
    finally:
        release.set()
        await asyncio.gather(*worker.abandoned, first, return_exceptions=True)


async def test_same_module_runs_on_memory_and_sqlite(unique: str, tmp_path: Any) -> None:
    from examples import orders

    for url in (f"memory://{unique}", f"sqlite:///{tmp_path}/switch.db"):
        orders.placed.clear()
        settings = oncely.load_settings(environ={"ONCELY_BROKER": url})
        only = ["examples.orders.place_order"]
        async with oncely.Worker(orders.app, settings=settings, handlers=only) as w:
            await orders.app.publish("orders", orders.Order(id="x", sku="s", qty=1))
            await orders.app.publish("orders", orders.Order(id="x", sku="s", qty=1))
            await eventually(lambda: w.stats.processed + w.stats.duplicates == 2)
        assert orders.placed == {"x": 1}, url


async def test_publisher_refuses_non_str_headers(unique: str) -> None:
    async with oncely.Publisher(f"memory://{unique}") as pub:
        with pytest.raises(TypeError, match="headers must map str to str"):
            await pub.publish("t", {}, headers={"n": 1})  # type: ignore[dict-item]


async def test_stop_after_a_failed_start_runs_no_shutdown_hook(unique: str) -> None:
    # The shutdown hooks close what the startup hooks opened; after a start that failed,
    # those never all ran (here none did), so stop() has nothing to undo.
    app = oncely.App()
    shut: list[str] = []

    @app.handler("t")
    async def handle(_: Any) -> None:
        pass

    @app.on_startup
    async def boom() -> None:
        raise RuntimeError("startup refused")

    @app.on_shutdown
    async def close() -> None:
        shut.append("closed")

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    with pytest.raises(RuntimeError, match="startup refused"):
        await worker.start()
    await worker.stop()
    assert shut == []
    assert worker.state == "failed" or worker.state == "stopped"
