"""Per-delivery paths found in review: every delivery settles, once, and the worker stops."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

import oncely
from oncely.brokers.memory import MemoryBroker
from oncely.runtime._keys import FIRST_RECHECK, Keys
from oncely.runtime.codec import fingerprint
from oncely.runtime.stats import Stats
from oncely.stores.memory import MemoryStore
from oncely.stores.registry import register_store
from tests._wait import eventually
from tests.runtime._faulty import WrappedBroker

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str


async def test_a_hanging_on_duplicate_hook_times_out_and_the_handler_goes_on(
    unique: str,
) -> None:
    app = oncely.App()
    hooks = 0
    seen: list[str] = []

    async def answer_again(result: None, ctx: oncely.Context) -> None:
        nonlocal hooks
        hooks += 1
        if hooks == 1:
            await asyncio.Event().wait()  # user code that never returns

    @app.handler(
        "t",
        idempotent=True,
        key="payload:id",
        concurrency=1,
        timeout=0.2,
        retry=oncely.RetryPolicy(base=0.01, jitter=False),
        on_duplicate=answer_again,
    )
    async def handle(order: Order) -> None:
        seen.append(order.id)

    async with oncely.Worker(app, broker=f"memory://{unique}", store="memory://") as worker:
        await app.publish("t", Order(id="a"))
        await eventually(lambda: seen == ["a"])
        await app.publish("t", Order(id="a"))  # its hook hangs: the timeout must apply
        await app.publish("t", Order(id="b"))
        await eventually(lambda: seen == ["a", "b"] and worker.stats.duplicates == 1)
    assert hooks == 2
    assert worker.stats.retried == 1


class CloseFailsStore(MemoryStore):
    """A third-party store whose ``aclose`` raises something other than an ``OncelyError``."""

    @classmethod
    def from_url(cls, url: str) -> CloseFailsStore:
        return cls()

    async def aclose(self) -> None:
        raise RuntimeError("driver blew up on close")


register_store("closefails-review", f"{__name__}:CloseFailsStore")


async def test_a_store_that_fails_to_close_still_lets_the_worker_stop(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = oncely.App()

    @app.handler("t", idempotent=True)
    async def handle(_: object) -> None:
        pass

    worker = oncely.Worker(app, broker=f"memory://{unique}", store="closefails-review://")
    await worker.start()
    broker = worker.broker
    assert isinstance(broker, MemoryBroker)
    await worker.stop()
    # Stopped for good: wait_stopped() returns (the CLI exits) and the broker was closed too.
    await asyncio.wait_for(worker.wait_stopped(), 5)
    with pytest.raises(oncely.ConnectionLost):
        await broker.publish("t", b"{}")
    assert "driver blew up on close" in caplog.text


def test_backoff_never_overflows_however_many_attempts_or_deferrals() -> None:
    # A store down for hours defers one key thousands of times, and the count feeds the
    # policy: 2.0**n overflows at n = 1024, which would fail every later deferral.
    policy = oncely.RetryPolicy(base=0.5, cap=60.0, jitter=False)
    assert policy.delay(5000) == 60.0
    keys = Keys("h", MemoryStore(), Stats(), visibility=30.0)
    delays = [keys.recheck_delay("k", retry_after=20.0) for _ in range(2000)]
    assert delays[0] == FIRST_RECHECK
    assert delays[-1] == 20.0


class SlowReleaseStore(MemoryStore):
    """Releases only once ``gate`` is set, so a give-back can be caught half-way."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.releasing = False

    async def release(self, key: str, token: str) -> None:
        self.releasing = True
        await self.gate.wait()
        await super().release(key, token)


async def test_a_second_cancel_during_the_give_back_neither_nacks_early_nor_twice(
    unique: str,
) -> None:
    app = oncely.App()
    running = asyncio.Event()

    @app.handler("t", idempotent=True, key="payload:id")
    async def handle(_: Order) -> None:
        running.set()
        await asyncio.Event().wait()

    broker = WrappedBroker(MemoryBroker(unique))
    store = SlowReleaseStore()
    worker = oncely.Worker(app, broker=broker, store=store)
    await worker.start()
    message_id = await app.publish("t", Order(id="a"))
    await running.wait()
    stopping = asyncio.create_task(worker.stop(grace=0))
    await eventually(lambda: store.releasing)
    (task,) = {task for pool in worker._pools for task in pool.tasks}
    task.cancel()  # a second cancel, as asyncio.run() gives every task left at exit
    await eventually(task.done)
    assert broker.nacks == []  # the lease is released before the nack, whatever the cancels
    store.gate.set()
    await stopping
    assert broker.nacks == [(message_id, 0.0, True)]
    assert worker.stats.settle_errors == 0


async def test_a_duplicate_still_waiting_after_one_in_process_wait_is_deferred_at_once() -> None:
    # The in-process wait holds a concurrency slot. Were every redelivery of a duplicate of a
    # long-running holder to wait again (up to LOCAL_WAIT_CAP each time), duplicates would
    # keep the handler's slots from every other message for as long as the holder runs.
    store = MemoryStore()
    await store.connect()
    keys = Keys("h", store, Stats(), visibility=30.0)
    fp = fingerprint(b"{}")
    holder = await keys.begin("h:k", fp)
    assert holder.outcome is oncely.Outcome.NEW
    keys.recheck_delay("h:k", retry_after=30.0)  # a duplicate already waited, then deferred
    again = asyncio.create_task(keys.begin("h:k", fp))
    await eventually(again.done, within=2)  # the local wait would last LOCAL_WAIT_CAP (5 s)
    assert again.result().outcome is oncely.Outcome.IN_PROGRESS


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


async def test_a_failure_that_cannot_be_printed_still_spends_attempts_then_dead_letters(
    unique: str,
) -> None:
    app = oncely.App()
    runs = 0

    @app.handler("t", retry=oncely.RetryPolicy(max_attempts=2, base=0.01, jitter=False))
    async def handle(_: object) -> None:
        nonlocal runs
        runs += 1
        raise Unprintable

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("t", {})
        await eventually(lambda: worker.stats.dead_lettered == 1)
        (letter,) = await worker.broker.dead_letters("t")  # type: ignore[union-attr]
    assert runs == 2 and worker.stats.retried == 1
    assert letter.reason == "Unprintable: <unprintable> (gave up after 2 attempts)"
    assert worker.stats.internal_errors == 0


async def test_a_runtime_error_on_every_attempt_ends_in_the_dead_letter_queue(
    unique: str,
) -> None:
    class BrokenStore(MemoryStore):
        """A third-party store that says NEW without a token: the runtime's own check fails."""

        async def begin(self, key: str, fingerprint: str, lease: float) -> oncely.Begin:
            return oncely.Begin(oncely.Outcome.NEW)

    app = oncely.App()

    @app.handler("t", idempotent=True, retry=oncely.RetryPolicy(max_attempts=2))
    async def handle(_: object) -> None:
        pass

    async with oncely.Worker(app, broker=f"memory://{unique}", store=BrokenStore()) as worker:
        await app.publish("t", {})
        # Each internal error is nacked for another try, but not for ever.
        await eventually(lambda: worker.stats.dead_lettered == 1)
        (letter,) = await worker.broker.dead_letters("t")  # type: ignore[union-attr]
    assert worker.stats.internal_errors == 2
    assert letter.reason.startswith("internal error: AssertionError")
    assert letter.reason.endswith("(gave up after 2 attempts)")


async def test_a_failure_cut_short_by_shutdown_is_still_settled_as_a_failure(
    unique: str,
) -> None:
    app = oncely.App()

    @app.handler(
        "t",
        idempotent=True,
        key="payload:id",
        retry=oncely.RetryPolicy(base=0.01, jitter=False),
    )
    async def handle(_: Order) -> None:
        raise RuntimeError("a real failure")

    broker = WrappedBroker(MemoryBroker(unique))
    store = SlowReleaseStore()
    worker = oncely.Worker(app, broker=broker, store=store)
    await worker.start()
    message_id = await app.publish("t", Order(id="a"))
    await eventually(lambda: store.releasing)  # the run failed; its lease is being released
    stopping = asyncio.create_task(worker.stop(grace=0))
    await eventually(lambda: worker.in_flight == 0)
    store.gate.set()
    await stopping
    # Nacked as the failure it was (its backoff, the attempt spent), not given back as a
    # deferral that the handler never ran.
    assert broker.nacks == [(message_id, 0.01, False)]
    assert worker.stats.retried == 1 and worker.stats.cancelled == 0
