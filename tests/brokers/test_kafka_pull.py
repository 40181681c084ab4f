"""The worker's tasks take ready Kafka deliveries themselves (``KafkaSubscription.take_ready``)
rather than through the consume loop: what one delivery does stays its own, and nothing
starts once the worker stops."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import oncely
from oncely.brokers._kafka_consume import KafkaSubscription
from oncely.brokers._kafka_delivery import KafkaDelivery
from oncely.brokers._kafka_eos import PULL_PASS
from oncely.brokers.kafka import KafkaBroker
from oncely.runtime._consume import PULL_RUN
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

request_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_id", default=None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def counting_pulls(on_take: Callable[[], None] = lambda: None) -> Iterator[list[str]]:
    """Record the id of every delivery a worker's task took itself, and call ``on_take`` (the
    consume loop, whose task is ``consume:<handler>``, takes ready deliveries the same way
    before it hands them over: those are not counted)."""
    taken: list[str] = []
    original = KafkaSubscription.take_ready

    def take_ready(self: KafkaSubscription) -> KafkaDelivery | None:
        delivery = original(self)
        task = asyncio.current_task()
        if delivery is not None and not (task and task.get_name().startswith("consume:")):
            taken.append(delivery.id)
            on_take()
        return delivery

    KafkaSubscription.take_ready = take_ready  # type: ignore[method-assign]
    try:
        yield taken
    finally:
        KafkaSubscription.take_ready = original  # type: ignore[method-assign]


async def test_tasks_take_ready_deliveries_and_context_variables_do_not_leak(
    unique: str,
) -> None:
    app = oncely.App()
    plain: list[int] = []
    seen: list[int | None] = []

    @app.handler(f"{unique}-plain", concurrency=1)
    async def count(n: int) -> None:
        plain.append(n)

    @app.handler(f"{unique}-ctx", concurrency=1)
    async def handle(n: int) -> None:
        seen.append(request_id.get())
        request_id.set(n)  # the task that ran this must not run the next one

    url = kafka_url(partitions=1, auto_offset_reset="earliest")
    # Published before the worker starts, so one fetch brings them all: each record of the
    # key is ready the moment the one before it is settled.
    async with KafkaBroker.from_url(url) as broker:
        for n in range(6):
            for topic in (f"{unique}-plain", f"{unique}-ctx"):
                await broker.publish(topic, b"%d" % n, headers={"oncely-key": "one"})
    with counting_pulls() as taken:
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == 12, 60)
    assert plain == list(range(6)), "one key, one partition: in order"
    assert seen == [None] * 6
    assert taken, "the handler that leaves its context alone takes the next record itself"


async def test_no_delivery_starts_once_the_worker_stops(unique: str) -> None:
    app = oncely.App()
    runs: list[int] = []
    release = asyncio.Event()

    @app.handler(unique, concurrency=1)
    async def handle(n: int) -> None:
        runs.append(n)
        if n == 0:
            await release.wait()

    url = kafka_url(f"g-{unique}", partitions=1, auto_offset_reset="earliest")
    worker = oncely.Worker(app, broker=url)
    await worker.start()
    for n in range(3):
        await app.publish(unique, n, key=f"k{n}")  # three keys: all ready behind the first
    await eventually(lambda: runs == [0], 60)
    stopping = asyncio.create_task(worker.stop(grace=30))
    await eventually(lambda: worker._stopping is not None and worker._stopping.is_set())
    release.set()
    await stopping
    assert runs == [0], "the task that finished record 0 took nothing more"
    assert worker.stats.processed == 1

    async with oncely.Worker(app, broker=url) as again:  # the same group: nothing was lost
        await eventually(lambda: again.stats.processed == 2, 60)
    assert runs == [0, 1, 2]


async def test_a_pulled_delivery_that_fails_or_times_out_frees_its_slot(unique: str) -> None:
    # The slot a task carries from one delivery to the next it took itself must be given up
    # exactly once on every way out of the handler: a failure, a timeout (a cancel the
    # runner absorbs), and a success.
    app = oncely.App()
    runs: list[int] = []
    release = asyncio.Event()
    fast = oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.02)

    @app.handler(unique, concurrency=1, timeout=0.5, retry=fast)
    async def handle(n: int) -> None:
        runs.append(n)
        if n == 1 and runs.count(1) == 1:
            raise RuntimeError("once")
        if n == 2 and runs.count(2) == 1:
            await release.wait()  # past the timeout: cancelled, then retried

    url = kafka_url(partitions=1, auto_offset_reset="earliest")
    async with KafkaBroker.from_url(url) as broker:
        for n in range(5):  # one fetch brings them all: each is ready behind the one before
            await broker.publish(unique, b"%d" % n, headers={"oncely-key": "one"})
    with counting_pulls() as taken:
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == 5, 60)
            await eventually(lambda: worker.in_flight == 0, 30)
            assert worker.stats.retried == 2
            pool = worker._pools[0]
            assert pool.in_flight == 0 and len(pool.tasks) <= 1
    assert sorted(runs) == [0, 1, 1, 2, 2, 3, 4]
    assert taken, "the records behind the first were taken by the task itself"


async def test_a_handler_that_never_awaits_still_lets_the_event_loop_run(unique: str) -> None:
    """A task takes ready records itself, and neither a handler that never awaits nor Kafka's
    ack suspends it: without a pause it would run a whole fetch in a row, the event loop (its
    I/O, its timers, the client's group heartbeats) starved meanwhile."""
    app = oncely.App()
    ticks = 0  # event-loop turns, counted by a task of its own
    runs: list[int] = []  # the tick each delivery saw

    @app.handler(unique, concurrency=1)
    async def handle(n: int) -> None:
        runs.append(ticks)

    url = kafka_url(partitions=1, auto_offset_reset="earliest")
    async with KafkaBroker.from_url(url) as broker:  # before the worker: one fetch brings all
        for n in range(300):
            await broker.publish(unique, b"%d" % n, headers={"oncely-key": str(n)})

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with counting_pulls() as taken:
            async with oncely.Worker(app, broker=url) as worker:
                await eventually(lambda: worker.stats.processed == 300, 60)
    finally:
        ticker.cancel()
    assert len(taken) > 2 * PULL_RUN, "the task took most records itself"
    longest = max(len(list(run)) for _, run in itertools.groupby(runs))
    # The one handed over, then PULL_RUN taken, then the loop runs.
    assert longest <= PULL_RUN + 1, longest


async def test_exactly_once_tasks_take_at_most_pull_pass_deliveries_in_a_pass(
    unique: str,
) -> None:
    """Exactly-once the tasks take ready deliveries themselves too (no hand-over through the
    consume loop), but at most ``PULL_PASS`` in one pass of the event loop, all tasks
    together: each round trip of a commit waits for the pass under way, and 16 tasks taking
    ``PULL_RUN`` each ran hundreds of records between two looks at the sockets. The copy
    stays exactly once."""
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()
    n = 2000

    @app.handler(src, concurrency=16)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    url = kafka_url(partitions=1, auto_offset_reset="earliest", exactly_once=src)
    async with KafkaBroker.from_url(url) as broker:  # before the worker: one fetch brings all
        await broker.ensure_topics([src, out])
        await asyncio.gather(*(
            broker.publish(src, b"%d" % i, headers={"oncely-key": str(i % 200)})
            for i in range(n)
        ))  # fmt: skip

    ticks = 0  # event-loop passes, counted by a task of its own
    pulled_at: list[int] = []  # the pass of each delivery a task took itself

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with counting_pulls(lambda: pulled_at.append(ticks)) as taken:
            async with oncely.Worker(app, broker=url) as worker:
                await eventually(lambda: worker.stats.processed == n, 60)
    finally:
        ticker.cancel()
    assert len(taken) > n // 2, "the tasks took most records themselves"
    # A pass's budget is renewed by a callback that runs early in the next pass, and the
    # ticker may run after it: between two ticks, at most the end of one budget and the next.
    busiest = max(Counter(pulled_at).values())
    assert busiest <= 2 * PULL_PASS, busiest
    copied = sorted(int(r.value) for r in await read_topic(out))
    assert copied == list(range(n)), "each exactly once"
