"""The Kafka broker on a real Apache Kafka: offsets, ordering, interop, options."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorLoadInProgressError, GroupCoordinatorNotAvailableError
from aiokafka.structs import TopicPartition

import oncely
from oncely.brokers.kafka import KafkaBroker
from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, DeliveryExpired
from tests._wait import eventually
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    # Broker behaviour does not depend on the loop; the conformance suite covers uvloop.
    return "asyncio"


def test_url_options_are_parsed_and_checked() -> None:
    broker = broker_from_url(
        "kafka://127.0.0.1:9092,127.0.0.1:9093/?group=g&partitions=3&ordering=partition"
        "&window=10&commit_interval=200ms&retry_buckets=2s,1m&exactly_once=a,b"
    )
    assert isinstance(broker, KafkaBroker)
    opts = broker.options
    assert (opts.bootstrap, opts.group, opts.partitions) == (
        "127.0.0.1:9092,127.0.0.1:9093",
        "g",
        3,
    )
    assert (opts.ordering, opts.window, opts.commit_interval) == ("partition", 10, 0.2)
    assert opts.buckets == (2.0, 60.0) and broker.capabilities.max_delay == 60.0
    assert opts.is_exactly_once("a") and not opts.is_exactly_once("c")
    caps = broker.capabilities
    assert (caps.ack_model, caps.extend, caps.transactions, caps.native_delay) == (
        "offset",
        True,
        True,
        False,
    )
    for bad in ("kafka://h:1/?grup=x", "kafka://h:1/?window=0", "kafka://h:1/?ordering=x",
                "kafka://h:1/path", "kafka://h:1/?retry_buckets=abc"):  # fmt: skip
        with pytest.raises(ConfigError):
            broker_from_url(bad)


async def test_plain_producer_records_are_consumed_and_outputs_are_plain(unique: str) -> None:
    async with KafkaBroker.from_url(kafka_url()) as broker:
        await broker.ensure_topics([unique])
        raw = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
        await raw.start()
        try:
            await raw.send_and_wait(unique, b"no headers, no key")
            await raw.send_and_wait(unique, b"keyed", key=b"k", headers=[("x", b"\xff\xfe")])
        finally:
            await raw.stop()
        mid = await broker.publish(unique, b"from oncely", headers={"h": "v\u00e9"})
        async with broker.consume(unique, prefetch=5, visibility=30) as sub:
            got = [await asyncio.wait_for(sub.__anext__(), 15) for _ in range(3)]
            for d in got:
                await d.ack()
    assert [d.id for d in got[:2]] == [f"{unique}/0/0", f"{unique}/0/1"]
    assert [d.attempt for d in got] == [1, 1, 1]
    assert got[1].headers["x"] == b"\xff\xfe".decode("latin-1")
    assert got[2].id == mid and got[2].headers["h"] == "v\u00e9"
    (_, _, third) = await read_topic(unique)
    headers = dict(third.headers)
    assert headers["h"] == "v\u00e9".encode() and headers["oncely-message-id"] == mid.encode()


async def test_settling_after_the_partition_is_gone_raises_delivery_expired(unique: str) -> None:
    url = kafka_url()
    async with KafkaBroker.from_url(url) as broker:
        await broker.publish(unique, b"x")
        sub = broker.consume(unique, prefetch=1, visibility=30)
        d = await asyncio.wait_for(sub.__anext__(), 15)
        await d.extend(30)  # owned: a no-op that succeeds
        await broker.aclose()  # the member leaves the group; the offset stays uncommitted
        with pytest.raises(DeliveryExpired):
            await d.extend(30)
        with pytest.raises(DeliveryExpired):
            await d.ack()
        async with (
            KafkaBroker.from_url(url) as again,
            again.consume(unique, prefetch=1, visibility=30) as sub2,
        ):
            redelivered = await asyncio.wait_for(sub2.__anext__(), 15)
            assert redelivered.id == d.id
            await redelivered.ack()


async def test_per_key_order_with_parallel_keys_in_one_partition(unique: str, report: Any) -> None:
    """Many keys, random handler durations: each key's messages complete in publish order,
    while messages of one partition run concurrently."""
    keys, per_key = 40, 25
    app = oncely.App()
    done: dict[str, list[int]] = defaultdict(list)
    running: dict[int, int] = defaultdict(int)
    peak: dict[int, int] = defaultdict(int)
    rng = random.Random(7)

    @app.handler(unique, concurrency=64)
    async def handle(p: dict[str, Any], ctx: oncely.Context) -> None:
        part = int(p["part"])
        running[part] += 1
        peak[part] = max(peak[part], running[part])
        await asyncio.sleep(rng.random() * 0.01)
        running[part] -= 1
        done[p["key"]].append(p["seq"])

    url = kafka_url(partitions=2)
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([unique])
        for seq in range(per_key):
            await asyncio.gather(*(
                broker.publish(unique, oncely_json(k, seq), headers={"oncely-key": f"k{k}"})
                for k in range(keys)
            ))  # fmt: skip
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.processed == keys * per_key, 60)
    assert {k: v for k, v in done.items() if v != sorted(v)} == {}
    assert all(len(v) == per_key for v in done.values()) and len(done) == keys
    report(
        f"kafka per-key order: {keys} keys x {per_key}, peak concurrency per partition {dict(peak)}"
    )
    assert max(peak.values()) > 1, "keys of one partition should run in parallel"


def oncely_json(k: int, seq: int) -> bytes:
    # Keys hash to partitions; the payload records which one so the test can measure overlap.
    part = _partition_of(f"k{k}".encode(), 2)
    return f'{{"key": "k{k}", "seq": {seq}, "part": {part}}}'.encode()


def _partition_of(key: bytes, partitions: int) -> int:
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@contextmanager
def worker_process(
    url: str, handler: str, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn_worker(url, handler, env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def spawn_worker(url: str, handler: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    full.update(env, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "oncely", "run", "tests.brokers.kafka_app:app",
        "--broker", url, "--handler", handler, "--log-level", "ERROR", "--grace", "10",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=full, cwd=ROOT, stderr=subprocess.DEVNULL)


async def committed_offsets(group: str, topic: str) -> dict[int, int]:
    # On a broker just started (a fresh data directory) the group coordinator takes a few
    # seconds to come up: until then the question has no answer yet, not an error.
    deadline = time.monotonic() + 30
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
            break
        except (GroupCoordinatorNotAvailableError, CoordinatorLoadInProgressError):
            if time.monotonic() > deadline:
                raise
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def read_lines(path: Path) -> list[str]:
    """The message ids in a ``kafka_app`` log, one per handler run."""
    return [line.split()[0] for line in read_log(path)]


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_slow_message_holds_the_commit_and_a_sigkill_redelivers_from_it(
    unique: str, tmp_path: Path
) -> None:
    n, k = 60, 23
    group = f"g-{unique}"
    # The reader below joins once the killed member's session has timed out: the smallest
    # Kafka allows, not the 10 s default.
    url = kafka_url(group, commit_interval="100ms", session_timeout_ms=6000)
    log = tmp_path / "handled.log"
    async with KafkaBroker.from_url(url) as broker:
        for i in range(n):
            await broker.publish(unique, b"hold" if i == k else b"ok", message_id=f"m{i}")
    env = {"KAFKA_APP_TOPIC": unique, "KAFKA_APP_LOG": str(log)}
    with worker_process(url, "record", env) as proc:
        await eventually(lambda: len(read_lines(log)) == n - 1, 60)
        # Everything but k completed; the commit stops at k and stays there.
        await eventually_async(lambda: committed_offsets(group, unique), {0: k}, 30)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert sorted(read_lines(log)) == sorted(f"m{i}" for i in range(n) if i != k)
    redelivered: list[str] = []
    async with KafkaBroker.from_url(url) as broker:
        async with broker.consume(unique, prefetch=100, visibility=30) as sub:
            while len(redelivered) < n - k:
                d = await asyncio.wait_for(sub.__anext__(), 20)
                redelivered.append(d.id)
                await d.ack()
            with pytest.raises(TimeoutError):
                extra = await asyncio.wait_for(sub.__anext__(), 1.0)
                pytest.fail(f"unexpected redelivery of {extra.id}")
    assert redelivered == [f"m{i}" for i in range(k, n)]


async def eventually_async(fetch: Any, expected: object, within: float) -> None:
    deadline = time.monotonic() + within
    while (value := await fetch()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{value!r} != {expected!r} after {within}s")
        await asyncio.sleep(0.1)


async def test_a_full_window_pauses_the_partition_and_the_member_stays(unique: str) -> None:
    """window=5: with five records unsettled the partition is paused; the member keeps
    polling (no rebalance, no redelivery) and resumes when one settles."""
    async with KafkaBroker.from_url(kafka_url(window=5, max_poll_interval_ms=3000)) as broker:
        for i in range(8):
            await broker.publish(unique, str(i).encode(), message_id=f"w{i}")
        async with broker.consume(unique, prefetch=100, visibility=30) as sub:
            held = [await asyncio.wait_for(sub.__anext__(), 15) for _ in range(5)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.__anext__(), 4.0)  # past max_poll_interval_ms
            tp = TopicPartition(unique, 0)
            assert tp in sub.consumer.paused()  # type: ignore[union-attr]
            await held[0].ack()
            more = [await asyncio.wait_for(sub.__anext__(), 15)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.__anext__(), 1.0)  # full again
            for d in [*held[1:], *more]:
                await d.extend(30)  # still owned: no rebalance happened
                await d.ack()
            more += [await asyncio.wait_for(sub.__anext__(), 15) for _ in range(2)]
            for d in more[1:]:
                await d.ack()
    assert [d.id for d in held + more] == [f"w{i}" for i in range(8)]


async def test_a_nack_that_cannot_store_its_copy_runs_the_record_again(unique: str) -> None:
    """The retry topic refuses the copy (its records may be 64 bytes at most): the nack
    fails, and the record must not be left unsettled, holding its partition's commit and its
    key for as long as this member lives. It runs again and completes."""
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        tiny = {"max.message.bytes": "64"}
        await admin.create_topics([NewTopic(f"{unique}.retry.1s", 1, 1, topic_configs=tiny)])
    finally:
        await admin.close()
    app = oncely.App()
    runs: list[str] = []

    @app.handler(unique, retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01))
    async def handle(body: bytes, ctx: oncely.Context) -> None:
        runs.append(body.decode())
        if runs.count(body.decode()) == 1 and body == b"first":
            raise ConnectionError("once")

    group = f"g-{unique}"
    async with KafkaBroker.from_url(kafka_url(group)) as broker:
        for body in (b"first", b"second"):
            await broker.publish(unique, body, headers={"oncely-key": "same"})
        async with oncely.Worker(app, broker=broker) as worker:
            await eventually(lambda: worker.stats.processed == 2, 60)
            await eventually_async(lambda: committed_offsets(group, unique), {0: 2}, 30)
    assert runs == ["first", "first", "second"]


async def test_a_failing_rebalance_callback_fails_the_subscription(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka logs a listener's exception and goes on; the subscription must not go on
    with a partition it never set up (its records would be dropped until the next
    rebalance): the iterating task gets the error and resubscribes."""
    from oncely.brokers._kafka_consume import KafkaSubscription
    from oncely.errors import BrokerError

    async def broken(self: KafkaSubscription, assigned: set[TopicPartition]) -> None:
        raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(KafkaSubscription, "on_assigned", broken)
    async with KafkaBroker.from_url(kafka_url()) as broker:
        await broker.publish(unique, b"x")
        async with broker.consume(unique, prefetch=1, visibility=30) as sub:
            with pytest.raises(BrokerError, match="bookkeeping bug"):
                await asyncio.wait_for(sub.__anext__(), 30)
