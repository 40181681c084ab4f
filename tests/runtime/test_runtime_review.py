"""Per-message paths found in review of the merged runtime hot path (``whole``, the single timeout
timer, the per-delivery logging context, the counters)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import oncely
from oncely.brokers.memory import MemoryBroker
from oncely.runtime import _finish, _whole
from oncely.runtime.heartbeat import Active, Heartbeat
from oncely.runtime.stats import Stats
from oncely.stores.memory import MemoryStore
from tests._wait import eventually
from tests.runtime import test_guarantees as guarantees
from tests.runtime import test_settle_review as settle_review
from tests.runtime._faulty import WrappedBroker

pytestmark = pytest.mark.anyio


class SlowReplyStore(MemoryStore):
    """A memory store whose first ``complete`` waits for a reply that does not come in time,
    under ``asyncio.timeout``: what a store calling redis-py directly does with its
    ``socket_timeout``, the AMQP adapter's nack with its publish timeout, and on Python 3.12+
    every ``wait_for``."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    async def complete(self, key: str, token: str, result: bytes | None, ttl: float) -> None:
        if self.timeouts == 0:
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.Event().wait()  # the reply that never comes
            except TimeoutError:
                self.timeouts += 1
                raise
        await super().complete(key, token, result, ttl)


async def test_a_store_call_timing_out_while_settling_is_retried_and_the_message_acked(
    unique: str,
) -> None:
    # The timeout cancels the task the store call runs on. Settled on the delivery's own task
    # (``whole``), that cancel was taken for a shutdown's: the rest of the settle was handed to a
    # new task with the timeout lost, which then waited on the reply for ever (never acked,
    # and aclose() hung on it).
    app = oncely.App()
    runs = 0

    @app.handler("t", idempotent=True)
    async def handle(_: Any) -> None:
        nonlocal runs
        runs += 1

    store = SlowReplyStore()
    worker = oncely.Worker(app, broker=f"memory://{unique}", store=store)
    await worker.start()
    try:
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.processed == 1, within=5)
    finally:
        await asyncio.wait_for(worker.stop(), 10)
    assert runs == 1 and store.timeouts == 1
    assert worker.stats.complete_retries == 1 and worker.stats.unrecorded == 0


async def test_a_duplicate_whose_ack_fails_is_counted_once_when_its_redelivery_is_acked(
    unique: str,
) -> None:
    app = oncely.App()
    runs = 0

    @app.handler("t", idempotent=True, visibility=0.3)
    async def handle(_: Any) -> None:
        nonlocal runs
        runs += 1

    acks = 0

    def fail_second_ack(_: object) -> None:
        nonlocal acks
        acks += 1
        if acks == 2:  # the duplicate's first ack
            raise oncely.ConnectionLost("ack lost")

    broker = WrappedBroker(MemoryBroker(unique), on_ack=fail_second_ack)
    async with oncely.Worker(app, broker=broker, store=MemoryStore()) as worker:
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.processed == 1)
        await app.publish("t", {}, key="k")
        # The failed ack leaves the duplicate to come back after its visibility.
        await eventually(lambda: acks == 3)
    assert runs == 1 and worker.stats.settle_errors == 1
    assert worker.stats.duplicates == 1


async def tasks_running(unique: str, n: int) -> list[asyncio.Task[Any] | None]:
    """The task each of ``n`` keyed deliveries ran on, one at a time, on the memory backends."""
    app = oncely.App()
    tasks: list[asyncio.Task[Any] | None] = []

    @app.handler("t", idempotent=True, key="payload:n", concurrency=1)
    async def handle(payload: dict[str, str]) -> None:
        tasks.append(asyncio.current_task())

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        for i in range(n):
            await app.publish("t", {"n": str(i)})
        await eventually(lambda: worker.stats.processed == n)
    return tasks


async def test_one_pooled_task_runs_delivery_after_delivery_with_keys_and_logging(
    unique: str,
) -> None:
    # Each run sets the logging context variable (and notes the key): it must be reset, or the
    # pool ends its task after every delivery (context changed) and the pool is no pool.
    tasks = await tasks_running(unique, 5)
    assert len(tasks) == 5 and len(set(tasks)) == 1


@pytest.mark.parametrize(
    "case",
    [
        guarantees.test_a_shutdown_cancel_does_not_cut_short_the_record_of_a_finished_effect,
        settle_review.test_a_second_cancel_during_the_give_back_neither_nacks_early_nor_twice,
        settle_review.test_a_failure_cut_short_by_shutdown_is_still_settled_as_a_failure,
    ],
)
async def test_the_shutdown_cases_hold_when_settling_on_the_delivery_task(
    case: Callable[[str], Awaitable[None]], unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their stores and brokers are test subclasses, which settle on a task of their own; the
    # same cases through ``whole`` (what the memory backends get).
    monkeypatch.setattr(_finish, "settles_inline", lambda broker, store: True)
    whole = _whole.whole
    used = 0

    def counted(*args: Any) -> Awaitable[object]:
        nonlocal used
        used += 1
        return whole(*args)

    monkeypatch.setattr(_finish, "whole", counted)
    await case(unique)
    assert used > 0


async def test_a_stubborn_handler_and_an_untimed_hook_hold_up_no_later_timeout() -> None:
    # The one timer walks the running deliveries oldest first: one that swallowed its cancel
    # (still running, already timed out) and an on_duplicate hook (timed by asyncio.timeout,
    # no deadline here) sit in front of a later delivery, which must still time out.
    heartbeat = Heartbeat("h", 30.0, extend=False, store=None, stats=Stats())
    stubborn_cancelled = asyncio.Event()
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                stubborn_cancelled.set()  # swallowed: runs on past its timeout

    async with MemoryBroker() as broker:
        await broker.publish("t", b"{}")
        sub = broker.consume("t", prefetch=1, visibility=30)
        delivery = await sub.__anext__()
        tasks = [asyncio.create_task(stubborn()), asyncio.create_task(stop.wait())]
        later = asyncio.create_task(stop.wait())
        head = Active(delivery, tasks[0])
        hook = Active(delivery, tasks[1])
        heartbeat.track(head, 0.05)
        heartbeat.track(hook)
        last = Active(delivery, later)
        try:
            await stubborn_cancelled.wait()
            heartbeat.track(last, 0.05)
            await eventually(later.done, within=5)
        finally:
            stop.set()
            await asyncio.gather(*tasks, later, return_exceptions=True)
        assert later.cancelled() and last.timed_out and head.timed_out and not hook.timed_out
        await sub.aclose()
    await heartbeat.aclose()
