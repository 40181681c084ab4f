"""Kafka throughput: oncely against plain aiokafka on the same topic, in one run.

Against a real Kafka (``ONCELY_TEST_KAFKA_URL``, default the local one from
``scripts/services.sh up``), one input topic of ``--partitions`` partitions holding
``--messages`` small keyed records is read by each contender in its own consumer group:

- ``raw``: aiokafka ``getmany`` (up to 500 records), then the no-op handler awaited on each
  record's value in offset order (which keeps per-partition and per-key order), then a
  manual ``commit`` of the batch;
- ``oncely key``: a Worker running the same no-op as an at-least-once handler, per-key
  ordering (default);
- ``oncely partition``: the same with ``ordering=partition``;
- ``raw txn copy``: aiokafka consume-transform-produce into an output topic, one
  transactional producer per input partition, a transaction per ``getmany`` batch of up to
  500 records of that partition, offsets sent in the transaction, the partitions'
  transactions of one batch committed concurrently;
- ``oncely txn copy``: a Worker in exactly-once mode whose handler ``ctx.produce``s each record
  to an output topic.

Each contender runs in its own process (so its client CPU time is its own; the broker is a
separate JVM), its clock starts before its consumer joins the group and stops once all
records are done and committed (the Worker is timed through ``stop()``). Rounds interleave
the contenders; the script prints medians of msgs/s, of client CPU µs per record
(``time.process_time``, steadier than wall time on a shared machine) and of the per-round
ratios to the raw loops (each round's line shows msgs/s and CPU µs per record of every
contender). ``--before DIR`` adds the oncely contenders of another source tree
(e.g. ``git archive <commit> | tar -x -C DIR``), run against the same raw loops.

``--loop uvloop`` runs every contender, raw loops and Workers alike, on uvloop (what
``oncely run`` uses when it is installed); the default is asyncio.

    python benchmarks/kafka_throughput.py [--messages 50000] [--partitions 4] [--rounds 3]
        [--loop asyncio|uvloop] [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition

import oncely
from oncely.brokers.kafka import KafkaBroker

HERE = Path(__file__).resolve().parent
URL = os.environ.get("ONCELY_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
BOOTSTRAP = URL.removeprefix("kafka://").split("/")[0]
BATCH = 500
ONCELY = ("oncely key", "oncely partition", "oncely txn copy")
RAW_OF = {"oncely key": "raw", "oncely partition": "raw", "oncely txn copy": "raw txn copy"}


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


class Counter:
    """The no-op handler every at-least-once contender awaits once per record."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.done = asyncio.Event()

    async def handle(self, body: bytes) -> None:
        self.count += 1
        if self.count == self.n:
            self.done.set()


async def raw(topic: str, n: int) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    handle = Counter(n).handle
    started = time.perf_counter()
    await consumer.start()
    seen = 0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=BATCH)
            for records in batch.values():
                for record in records:
                    await handle(record.value or b"")
                seen += len(records)
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return n / (time.perf_counter() - started)


async def raw_copy(topic: str, out: str, n: int) -> float:
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

    async def copy(tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
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

    started = time.perf_counter()
    await consumer.start()
    seen = 0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=BATCH)
            # The partitions' transactions at once, as their producers are independent (and
            # as oncely commits them): one after another, the loop waited on each commit.
            await asyncio.gather(*(copy(tp, records) for tp, records in batch.items()))
            seen += sum(len(records) for records in batch.values())
    finally:
        await consumer.stop()
        for producer in producers.values():
            await producer.stop()
    return n / (time.perf_counter() - started)


async def with_worker(
    topic: str, out: str | None, n: int, concurrency: int, **opts: object
) -> float:
    app = oncely.App("bench")
    counter = Counter(n)

    @app.handler(topic, concurrency=concurrency)
    async def handle(body: bytes, ctx: oncely.Context) -> None:
        if out is not None:
            await ctx.produce(out, body, key=ctx.headers.get("oncely-key"))
        await counter.handle(body)

    if out is not None:
        opts = {**opts, "exactly_once": topic}
    worker = oncely.Worker(app, broker=url(f"oncely-{uuid.uuid4().hex[:8]}", **opts))
    started = time.perf_counter()
    await worker.start()
    await counter.done.wait()
    await worker.stop()  # the last commits are part of the work
    elapsed = time.perf_counter() - started
    assert worker.stats.processed >= n, worker.stats
    return n / elapsed


async def child(contender: str, topic: str, n: int, concurrency: int) -> tuple[float, float]:
    """Run one contender in this process: (msgs/s, client CPU µs per record)."""
    out = f"{topic}-out"
    cpu = time.process_time()
    if contender == "raw":
        rate = await raw(topic, n)
    elif contender == "raw txn copy":
        rate = await raw_copy(topic, out, n)
    elif contender == "oncely key":
        rate = await with_worker(topic, None, n, concurrency)
    elif contender == "oncely partition":
        rate = await with_worker(topic, None, n, concurrency, ordering="partition")
    else:
        rate = await with_worker(topic, out, n, concurrency)
    return rate, (time.process_time() - cpu) / n * 1e6


def run(args: argparse.Namespace, contender: str, topic: str, tree: Path) -> tuple[float, float]:
    """One contender in a fresh process whose ``oncely`` comes from ``tree``."""
    command = [sys.executable, str(HERE / "kafka_throughput.py"), "--child", contender]
    command += ["--topic", topic, "--messages", str(args.messages)]
    command += ["--concurrency", str(args.concurrency), "--loop", args.loop]
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE}"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{contender} from {tree} failed:\n{done.stderr[-3000:]}")
    rate, cpu = (float(x) for x in done.stdout.split()[-2:])
    return rate, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another source tree to compare")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        coro = child(args.child, args.topic, args.messages, args.concurrency)
        if args.loop == "uvloop":
            import uvloop

            rate, cpu = uvloop.run(coro)
        else:
            rate, cpu = asyncio.run(coro)
        print(f"{rate:.1f} {cpu:.2f}")
        return
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    asyncio.run(fill(topic, f"{topic}-out", args.messages, args.partitions))
    trees = {"": HERE.parent} | ({"before ": args.before.resolve()} if args.before else {})
    order = ["raw", *(t + c for t in trees for c in ONCELY[:2])]
    order += ["raw txn copy", *(t + ONCELY[2] for t in trees)]
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in order}
    for i in range(args.rounds):
        rates: dict[str, float] = {}
        cpus: dict[str, float] = {}
        for name in order:
            before = name.startswith("before ")
            contender = name.removeprefix("before ")
            tree = trees["before " if before else ""]
            rate, cpu = run(args, contender, topic, tree)
            rates[name], cpus[name] = rate, cpu
            base = RAW_OF.get(contender)
            rows[name].append((rate, cpu, rate / rates[base] if base else 1.0))
        shown = ", ".join(f"{k} {v:,.0f} ({cpus[k]:.1f} us)" for k, v in rates.items())
        print(f"round {i + 1}: {shown}", flush=True)
    med = {name: [statistics.median(r[j] for r in v) for j in range(3)] for name, v in rows.items()}
    print(f"\nkafka, {args.messages} messages, {args.partitions} partitions, {args.loop}, ", end="")
    print(f"{args.rounds} rounds, medians")
    print(f"  {'':<24}{'msgs/s':>9}{'CPU us/rec':>12}{'x raw':>8}")
    for name, (rate, cpu, ratio) in med.items():
        shown = f"{ratio:>7.2f}x" if name.removeprefix("before ") in RAW_OF else ""
        print(f"  {name:<24}{rate:>9,.0f}{cpu:>12.1f}{shown}")
    eos = [r[0] / k[0] for r, k in zip(rows["oncely txn copy"], rows["oncely key"], strict=True)]
    print(f"  exactly-once / at-least-once (per key): {statistics.median(eos):.2f}x")


if __name__ == "__main__":
    main()
