"""Kafka throughput: oncely against plain aiokafka on the same topic, in one run.

Against a real Kafka (``ONCELY_TEST_KAFKA_URL``, default the local one from
``scripts/services.sh up``), one input topic of ``--partitions`` partitions holding
``--messages`` small keyed records is read by each contender in its own consumer group:

- ``raw``: aiokafka ``getmany`` plus a manual ``commit`` after every batch (up to 500);
- ``oncely key``: a Worker running a no-op at-least-once handler, per-key ordering (default);
- ``oncely partition``: the same with ``ordering=partition``;
- ``raw txn copy``: aiokafka consume-transform-produce into an output topic, one
  transactional producer per input partition, a transaction per ``getmany`` batch of up to
  500 records of that partition, offsets sent in the transaction;
- ``oncely txn copy``: a Worker in exactly-once mode whose handler ``ctx.produce``s each record
  to an output topic (``txn_messages=500``).

Every contender's clock starts before its consumer joins the group and stops once all records
are done and committed (the Worker is timed through ``stop()``). It prints msgs/s (median of
``--rounds``), the ratios to the raw loops, and exactly-once over at-least-once.

    python benchmarks/kafka_throughput.py [--messages 50000] [--partitions 4] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

import oncely
from oncely.brokers.kafka import KafkaBroker

URL = os.environ.get("ONCELY_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
BOOTSTRAP = URL.removeprefix("kafka://").split("/")[0]
BATCH = 500


def url(group: str, **options: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in options.items())
    return f"kafka://{BOOTSTRAP}/?group={group}{extra}"


async def fill(topic: str, out: str, n: int, partitions: int) -> None:
    async with KafkaBroker.from_url(url("bench-fill", partitions=partitions)) as broker:
        await broker.ensure_topics([topic, out])
        for start in range(0, n, 5000):
            await asyncio.gather(*(
                broker.publish(topic, b"%d" % i, headers={"oncely-key": f"k{i % 1000}"})
                for i in range(start, min(n, start + 5000))
            ))  # fmt: skip


async def raw(topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    started = time.perf_counter()
    await consumer.start()
    seen = 0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=BATCH)
            seen += sum(len(records) for records in batch.values())
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return n / (time.perf_counter() - started)


async def raw_copy(topic: str, out: str, n: int, partitions: int) -> float:
    group = f"rawtx-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producers: dict[TopicPartition, AIOKafkaProducer] = {}
    started = time.perf_counter()
    await consumer.start()
    seen = 0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=BATCH)
            for tp, records in batch.items():
                producer = producers.get(tp)
                if producer is None:
                    producer = AIOKafkaProducer(
                        bootstrap_servers=BOOTSTRAP,
                        transactional_id=f"{group}-{tp.topic}-{tp.partition}",
                        linger_ms=5,
                    )
                    await producer.start()
                    producers[tp] = producer
                async with producer.transaction():
                    for r in records:
                        await producer.send(out, r.value, key=r.key, headers=list(r.headers))
                    await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, group)
                seen += len(records)
    finally:
        await consumer.stop()
        for producer in producers.values():
            await producer.stop()
    return n / (time.perf_counter() - started)


async def with_worker(
    topic: str, out: str | None, n: int, concurrency: int, **opts: object
) -> float:
    app = oncely.App("bench")
    done = asyncio.Event()
    count = 0

    @app.handler(topic, concurrency=concurrency)
    async def handle(body: bytes, ctx: oncely.Context) -> None:
        nonlocal count
        if out is not None:
            await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))
        count += 1
        if count == n:
            done.set()

    if out is not None:
        opts = {**opts, "exactly_once": topic}
    worker = oncely.Worker(app, broker=url(f"oncely-{uuid.uuid4().hex[:8]}", **opts))
    started = time.perf_counter()
    await worker.start()
    await done.wait()
    await worker.stop()  # the last commits are part of the work
    elapsed = time.perf_counter() - started
    assert worker.stats.processed >= n, worker.stats
    return n / elapsed


async def measure(n: int, partitions: int, concurrency: int, rounds: int) -> dict[str, float]:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await fill(topic, f"{topic}-out", n, partitions)
    runs: dict[str, Callable[[], Awaitable[float]]] = {
        "raw": lambda: raw(topic, n),
        "oncely key": lambda: with_worker(topic, None, n, concurrency),
        "oncely partition": lambda: with_worker(topic, None, n, concurrency, ordering="partition"),
        "raw txn copy": lambda: raw_copy(topic, f"{topic}-out", n, partitions),
        "oncely txn copy": lambda: with_worker(topic, f"{topic}-out", n, concurrency),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(await run())
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    r = asyncio.run(measure(args.messages, args.partitions, args.concurrency, args.rounds))
    print(f"kafka, {args.messages} messages, {args.partitions} partitions, asyncio")
    for name, rate in r.items():
        print(f"  {name:<18} {rate:>9,.0f} msgs/s")
    print(f"  oncely key / raw                 {r['oncely key'] / r['raw']:.2f}x")
    print(f"  oncely partition / raw           {r['oncely partition'] / r['raw']:.2f}x")
    print(f"  oncely txn copy / raw txn copy   {r['oncely txn copy'] / r['raw txn copy']:.2f}x")
    print(f"  exactly-once / at-least-once     {r['oncely txn copy'] / r['oncely key']:.2f}x")


if __name__ == "__main__":
    main()
