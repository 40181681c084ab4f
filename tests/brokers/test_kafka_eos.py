"""Exactly-once consume-transform-produce on a real Kafka.

The copy test is modelled on Kafka's own transactional copier system test: worker processes
copy a multi-partition input topic to an output topic through an exactly-once handler while
one of them is SIGKILLed and restarted, again and again; a ``read_committed`` consumer of the
output must then see every input exactly once, in order per partition.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

import oncely
from oncely.brokers._kafka_delivery import ExactlyOnceDelivery
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url, read_topic
from tests.brokers.test_kafka import committed_offsets, read_lines, read_log, spawn_worker

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def publish_numbers(broker: KafkaBroker, topic: str, n: int, keys: int) -> None:
    for start in range(0, n, 2000):
        await asyncio.gather(*(
            broker.publish(topic, str(i).encode(), headers={"oncely-key": f"k{i % keys}"})
            for i in range(start, min(n, start + 2000))
        ))  # fmt: skip


async def test_a_failed_handlers_outputs_are_never_sent_and_it_retries(unique: str) -> None:
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()
    runs: Counter[str] = Counter()

    @app.handler(src, concurrency=8, retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01))
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        runs[body.decode()] += 1
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))
        if body == b"7" and ctx.attempt == 1:
            raise ConnectionError("after producing")  # the output must not be seen

    url = kafka_url(partitions=2, exactly_once=src)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await publish_numbers(broker, src, 40, keys=5)
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.retried == 1 and runs["7"] == 2, 60)
            group, expected = broker.options.group, {0: 0, 1: 0}
            for record in await read_topic(src):
                expected[record.partition] = record.offset + 1
            await eventually_offsets(group, src, expected)
    committed = Counter(r.value.decode() for r in await read_topic(out))
    assert committed == Counter(str(i) for i in range(40)), "read_committed: each exactly once"
    everything = await read_topic(out, committed_only=False)
    assert len(everything) == 40, "the failed attempt's output never reached the log"
    assert runs["7"] == 2


async def eventually_offsets(group: str, topic: str, expected: dict[int, int]) -> None:
    deadline = time.monotonic() + 60
    while (got := await committed_offsets(group, topic)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"committed {got} != {expected}")
        await asyncio.sleep(0.2)


def busiest(procs: list[Any], log_path: Path) -> int:
    """The index of the worker that ran most of the last handler runs logged. Killing that one
    lands on a member that holds partitions with records in flight; taking turns could kill a
    worker that had just joined and owned nothing yet (on a loaded machine all three kills
    once found nothing in flight)."""
    recent = read_log(log_path)[-501:-1]  # the last line may still be being written
    counts = Counter(line.split()[1] for line in recent if len(line.split()) == 2)
    return max(range(len(procs)), key=lambda i: counts.get(str(procs[i].pid), 0))


@pytest.mark.slow
async def test_exactly_once_copy_survives_repeated_sigkills(
    unique: str, report: Any, tmp_path: Path
) -> None:
    n, partitions, keys, kills = 50_000, 4, 64, 3
    src, out = f"{unique}-in", f"{unique}-out"
    group = f"g-{unique}"
    # A killed member is noticed after its session timeout: the smallest Kafka allows.
    url = kafka_url(group, partitions=partitions, exactly_once=src, session_timeout_ms=6000)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        await publish_numbers(broker, src, n, keys)
    inputs = await read_topic(src)
    assert len(inputs) == n
    ends = {p: 0 for p in range(partitions)}
    for r in inputs:
        ends[r.partition] = r.offset + 1
    log_path = tmp_path / "runs.log"
    env = {"KAFKA_APP_TOPIC": src, "KAFKA_APP_OUT": out, "KAFKA_APP_LOG": str(log_path)}
    procs = [spawn_worker(url, "copy", env) for _ in range(2)]
    started = time.monotonic()
    killed = 0
    try:
        for step in range(kills):
            # Kill at about 20%, 40%, 60% of the copy: a worker mid-transaction.
            target = n * (step + 1) // (kills + 2)
            await eventually_progress(group, src, target)
            busy = busiest(procs, log_path)
            victim = procs[busy]
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            killed += 1
            procs[busy] = spawn_worker(url, "copy", env)
        await eventually_offsets_within(group, src, ends, 240)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
                p.wait(timeout=30)
    outputs = await read_topic(out)
    source = {r.value: (r.partition, r.offset) for r in inputs}
    seen = Counter(r.value for r in outputs)
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    missing = n - len(set(seen) & set(source))
    out_of_order = 0
    last: dict[int, int] = {}
    for r in outputs:
        part, offset = source[r.value]
        assert part == r.partition, "same key, same partition count: same partition"
        if offset <= last.get(part, -1):
            out_of_order += 1
        last[part] = offset
    uncommitted = len(await read_topic(out, committed_only=False)) - len(outputs)
    runs = read_lines(log_path)
    report(
        f"kafka exactly-once copy: {n} messages, {partitions} partitions, 2 workers, "
        f"{killed} SIGKILLs: {len(outputs)} committed outputs, {duplicates} duplicates, "
        f"{missing} missing, {out_of_order} out of order; {len(runs) - n} handler runs "
        f"again, {uncommitted} aborted records in the log; {elapsed:.1f}s "
        f"({n / elapsed:.0f} msgs/s)"
    )
    assert (duplicates, missing, out_of_order, len(outputs)) == (0, 0, 0, n)
    # Each kill lands while the victim holds fetched records whose offsets are not committed
    # (its handlers ran, their outputs buffered for the next transaction): the new owner reads
    # them again, which is what the zero duplicates above are about. Whether a kill also caught
    # a transaction's outputs already in the log (aborted records, printed above) is luck:
    # outputs go out in one burst just before the commit, so most kills find none there.
    assert killed == kills
    # What the kills must have done: caught records whose handlers had run (their outputs
    # produced) but whose transaction had not committed, so they ran again at the new owner,
    # and still each output above is committed once. Without this the test could pass with
    # kills that found nothing in flight.
    assert len(set(runs)) == n and len(runs) > n, "no kill caught a record in flight"


async def eventually_progress(group: str, topic: str, target: int) -> None:
    deadline = time.monotonic() + 180
    while sum((await committed_offsets(group, topic)).values()) < target:
        if time.monotonic() > deadline:
            raise AssertionError(f"the copy did not reach {target} within 180s")
        await asyncio.sleep(0.1)


async def eventually_offsets_within(
    group: str, topic: str, expected: dict[int, int], within: float
) -> None:
    deadline = time.monotonic() + within
    while (got := await committed_offsets(group, topic)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"committed {got} != {expected} after {within}s")
        await asyncio.sleep(0.2)


async def test_produce_outside_exactly_once_is_a_plain_publish(unique: str) -> None:
    """Without a transactional delivery, ``ctx.produce`` publishes at once (and the output
    stays even though the handler then fails)."""
    app = oncely.App()

    @app.handler(unique, retry=oncely.RetryPolicy(max_attempts=1))
    async def fan_out(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(f"{unique}-out", body, key="k")
        raise ValueError("after producing")

    url = kafka_url()
    async with KafkaBroker.from_url(url) as broker:
        await broker.publish(unique, b"one")
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.dead_lettered == 1, 60)
    outputs = await read_topic(f"{unique}-out")
    assert [(r.value, r.key) for r in outputs] == [(b"one", b"k")]


async def test_a_fenced_producer_gives_the_partition_up(unique: str) -> None:
    """Another producer with the partition's transactional id (a new owner) fences this one:
    its open transaction is aborted, the partition is given up, the outputs never show, and
    the message is read again from the committed offset."""
    group = f"g-{unique}"
    out = f"{unique}-out"
    url = kafka_url(group, exactly_once=unique)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"a")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        d = await asyncio.wait_for(sub.__anext__(), 15)
        assert isinstance(d, ExactlyOnceDelivery)
        await d.produce(out, b"from the zombie")
        usurper = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP, transactional_id=f"oncely-{group}-{unique}-0"
        )
        await usurper.start()  # InitProducerId: fences the subscription's producer
        try:
            await d.ack()  # marks it done; the commit that follows is refused
            await eventually(lambda: not d.track.live, 15)
        finally:
            await usurper.stop()
        await sub.aclose()
    assert await read_topic(out) == []
    async with KafkaBroker.from_url(url) as broker:
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            again = await asyncio.wait_for(sub.__anext__(), 30)
            assert (again.id, again.body) == (d.id, b"a")
            await again.ack()


async def test_an_ack_landing_while_a_transaction_opens_keeps_its_outputs(unique: str) -> None:
    """Two records of one partition settle together: the second lands while the first's
    flush is opening the transaction. The commit must not pass the second's offset unless
    its outputs went into that transaction, or they would never be sent."""
    group, out = f"g-{unique}", f"{unique}-out"
    url = kafka_url(group, exactly_once=unique, txn_messages=1)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        for body in (b"a", b"b"):
            await broker.publish(unique, body)  # no key: both may run at once
        async with broker.consume(unique, prefetch=2, visibility=30) as sub:
            first, second = [await asyncio.wait_for(sub.__anext__(), 15) for _ in range(2)]
            assert isinstance(first, ExactlyOnceDelivery)
            assert isinstance(second, ExactlyOnceDelivery)
            await first.produce(out, b"out-a")
            await second.produce(out, b"out-b")
            await asyncio.gather(first.ack(), second.ack())
            await eventually_offsets(group, unique, {0: 2})
    assert sorted(r.value for r in await read_topic(out)) == [b"out-a", b"out-b"]


@pytest.mark.slow
async def test_exactly_once_across_rebalances_that_reread_fresh_commits(
    unique: str, report: Any
) -> None:
    """A member joins and leaves three times mid-copy. Each rebalance makes every member
    commit its partitions' transactions on revoke and, moments later, init the producers
    again and read the committed offsets it has just written (the read that, without
    KIP-447's stable offsets, could come back short and replay a batch). The output must
    still hold every input exactly once, in order per partition."""
    n, partitions, cycles = 6000, 4, 3
    src, out = f"{unique}-in", f"{unique}-out"
    group = f"g-{unique}"
    url = kafka_url(group, partitions=partitions, exactly_once=src, txn_messages=50)
    app = oncely.App()

    @app.handler(src, concurrency=16)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))

    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([src, out])
        await publish_numbers(broker, src, n, keys=32)
    inputs = await read_topic(src)
    ends = {p: 0 for p in range(partitions)}
    for r in inputs:
        ends[r.partition] = r.offset + 1
    async with oncely.Worker(app, broker=url):
        for step in range(cycles):
            await eventually_progress(group, src, n * (2 * step + 1) // (2 * cycles + 2))
            async with oncely.Worker(app, broker=url):
                await eventually_stable_members(group, 2)
                await eventually_progress(group, src, n * (2 * step + 2) // (2 * cycles + 2))
        await eventually_offsets_within(group, src, ends, 120)
    outputs = await read_topic(out)
    source = {r.value: (r.partition, r.offset) for r in inputs}
    seen = Counter(r.value for r in outputs)
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    missing = n - len(set(seen) & set(source))
    out_of_order = 0
    last: dict[int, int] = {}
    for r in outputs:
        part, offset = source[r.value]
        out_of_order += offset <= last.get(part, -1)
        last[part] = offset
    report(
        f"kafka exactly-once across {2 * cycles} rebalances: {n} messages, {len(outputs)} "
        f"committed outputs, {duplicates} duplicates, {missing} missing, "
        f"{out_of_order} out of order"
    )
    assert (duplicates, missing, out_of_order, len(outputs)) == (0, 0, 0, n)


async def eventually_stable_members(group: str, members: int) -> None:
    """Wait until the group is stable with ``members`` members (a rebalance completed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            (response,) = await admin.describe_consumer_groups([group])
            (described,) = response.to_object()["groups"]
            if described["state"] == "Stable" and len(described["members"]) == members:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"group {group} not stable with {members}: {described}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def test_closing_while_the_assignment_is_taken_stops_its_producers(unique: str) -> None:
    """The subscription closes just as the group assigns it partitions: the producers the
    assignment starts (one per partition) while the consumer stops must be stopped too,
    not left running with their connections."""
    url = kafka_url(exactly_once=unique)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([unique])
        sub = broker.consume(unique, prefetch=1, visibility=30)
        pending = asyncio.ensure_future(sub.__anext__())
        await eventually(lambda: sub.consumer is not None and bool(sub.consumer.assignment()), 30)
        await sub.aclose()  # the assignment callback is starting the producers now
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 15)
        held = sub._eos._txns  # type: ignore[union-attr]
        assert held == {}, f"producers left running after close: {sorted(map(str, held))}"


async def test_a_fenced_member_takes_its_partition_again(unique: str) -> None:
    """A producer of the partition's transactional id that is not another member (an
    operator's tool, a transaction timed out by the coordinator) fences this member's
    producer. No rebalance follows, so the member must not wait for one: it resubscribes,
    takes the partition again and goes on, the fenced attempt's output never shown."""
    group, out = f"g-{unique}", f"{unique}-out"
    url = kafka_url(group, exactly_once=unique)
    app = oncely.App()

    @app.handler(unique)
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        await ctx.produce(out, body)

    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([out])
        await broker.publish(unique, b"1")
        async with oncely.Worker(app, broker=url) as worker:
            await eventually(lambda: worker.stats.processed == 1, 60)
            # Processed is not committed: the transaction commits on the next flush. Fencing
            # before it would send "1" round again, and "processed" would pass 2 on "1".
            await eventually_offsets(group, unique, {0: 1})
            usurper = AIOKafkaProducer(
                bootstrap_servers=BOOTSTRAP, transactional_id=f"oncely-{group}-{unique}-0"
            )
            await usurper.start()  # InitProducerId: fences the worker's producer
            await usurper.stop()
            await broker.publish(unique, b"2")
            await eventually(lambda: worker.stats.processed == 2, 60)
            await eventually_offsets(group, unique, {0: 2})
    assert [r.value for r in await read_topic(out)] == [b"1", b"2"]


async def test_produce_refuses_an_empty_key_as_publish_does(unique: str) -> None:
    # Before, the exactly-once path sent it: every output with key "" shared one idempotency
    # key downstream, where an effectively-once consumer ran only the first.
    src, out = f"{unique}-in", f"{unique}-out"
    app = oncely.App()
    errors: list[ValueError] = []

    @app.handler(src, retry=oncely.RetryPolicy(max_attempts=1))
    async def copy(body: bytes, ctx: oncely.Context) -> None:
        try:
            await ctx.produce(out, body, key="")
        except ValueError as exc:
            errors.append(exc)
        await ctx.produce(out, body, key="k")

    async with KafkaBroker.from_url(kafka_url(exactly_once=src)) as broker:
        await broker.ensure_topics([out])
        await broker.publish(src, b"one")
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.processed == 1, 60)
    assert [str(e) for e in errors] == [
        "key must be a non-empty string (an empty key would be shared by every message "
        "published with it); pass key=None for none"
    ]
    assert [(r.value, dict(r.headers)["oncely-key"]) for r in await read_topic(out)] == [
        (b"one", b"k")
    ]
