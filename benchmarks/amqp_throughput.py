"""RabbitMQ throughput: publish pipelining, batched acks, and the Worker against a bare loop.

Against a real RabbitMQ (``ONCELY_TEST_AMQP_URL``, default the local one from
``scripts/services.sh up``), for each event loop (asyncio, uvloop), in this one process run:

- ``publish 1-by-1``: each publish awaits its confirm before the next starts;
- ``publish pipelined``: ``--in-flight`` publishes awaited concurrently on the shared channel;
- ``raw``: plain aio-pika (no oncely) consuming the same queue with the same prefetch and
  acking each message, the least any consumer can do;
- ``oncely``: a Worker running a no-op at-least-once handler (acks batched, the default);
- ``oncely, acks 1-by-1``: the same with ``batch_acks=0``, to show what batching buys;
- ``oncely+idem``: the handler effectively-once, through an in-process ``memory://`` store.

It prints msgs/s (the median of ``--rounds`` interleaved runs) and ratios measured in the same
run. ``raw`` acks each message before it takes the next, while the Worker runs
``--concurrency`` handlers at once and batches acks, so the Worker can beat it. Nothing is asserted.

    python benchmarks/amqp_throughput.py [--messages 5000] [--concurrency 32] [--quorum]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import throughput  # the sibling script: one Worker timing for every broker
import uvloop

from oncely.brokers._amqp_topology import topology
from oncely.brokers.amqp import AmqpBroker

URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def with_options(url: str, **options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


async def delete_topology(topic: str) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name, _ in topology(topic, "classic"):
            await channel.queue_delete(name)


async def publish_rate(url: str, topic: str, n: int, in_flight: int) -> float:
    """Publish ``n`` bodies with at most ``in_flight`` confirms outstanding."""
    async with AmqpBroker(url) as broker:
        await broker._ensure_topology(topic)  # not part of the measurement
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                await broker.publish(topic, b'{"n": %d}' % i, headers={"oncely-key": f"k{i}"})

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


async def raw(url: str, topic: str, n: int, concurrency: int) -> float:
    """Plain aio-pika, no oncely: the same queue, the same prefetch, ack after each message."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(topic, ensure=False)
        started = time.perf_counter()
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                seen += 1
                if seen == n:
                    break
        return n / (time.perf_counter() - started)


async def with_worker(url: str, topic: str, n: int, concurrency: int, idem: bool) -> float:
    store = f"memory://bench-{uuid.uuid4().hex[:8]}" if idem else None
    return await throughput.with_worker(url, topic, n, concurrency, idem, store)


async def measure(args: argparse.Namespace) -> dict[str, float]:
    n, concurrency = args.messages, args.concurrency
    url = with_options(URL, queue_type="quorum") if args.quorum else URL
    unbatched = with_options(url, batch_acks=0)
    results: dict[str, float] = {}
    topics: list[str] = []

    def fresh() -> str:
        topics.append(f"bench-{uuid.uuid4().hex[:8]}")
        return topics[-1]

    try:
        results["publish 1-by-1"] = await publish_rate(url, fresh(), min(n, 2000), 1)
        consumers: list[tuple[str, Callable[[str], Awaitable[float]]]] = [
            ("raw", lambda t: raw(url, t, n, concurrency)),
            ("oncely", lambda t: with_worker(url, t, n, concurrency, idem=False)),
            ("oncely, acks 1-by-1", lambda t: with_worker(unbatched, t, n, concurrency, False)),
            ("oncely+idem", lambda t: with_worker(url, t, n, concurrency, idem=True)),
        ]
        samples: dict[str, list[float]] = {"publish pipelined": []}
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits all alike
            for name, run in consumers:
                topic = fresh()
                samples["publish pipelined"].append(
                    await publish_rate(url, topic, n, args.in_flight)
                )
                samples.setdefault(name, []).append(await run(topic))
                await delete_topology(topics.pop())
        results.update({name: statistics.median(rates) for name, rates in samples.items()})
    finally:
        for topic in topics:
            await delete_topology(topic)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=256, help="pipelined publishes")
    parser.add_argument("--quorum", action="store_true", help="use quorum queues")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure; medians shown")
    args = parser.parse_args()
    kind = "quorum" if args.quorum else "classic"
    print(
        f"RabbitMQ, {kind} queues, {args.messages} messages, concurrency/prefetch "
        f"{args.concurrency}, {args.in_flight} publishes in flight, median of {args.rounds}\n"
    )
    rows: dict[str, dict[str, float]] = {}
    for loop in ("asyncio", "uvloop"):
        coro = measure(args)
        rows[loop] = uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
    names = list(rows["asyncio"])
    print(f"{'':<22}" + "".join(f"{loop:>12}" for loop in rows))
    for name in names:
        print(f"{name:<22}" + "".join(f"{rows[loop][name]:>12,.0f}" for loop in rows))
    print()
    for loop, r in rows.items():
        print(
            f"{loop}: pipelined/1-by-1 publish {r['publish pipelined'] / r['publish 1-by-1']:.1f}x,"
            f" oncely/raw {r['oncely'] / r['raw']:.2f}x,"
            f" batched/unbatched acks {r['oncely'] / r['oncely, acks 1-by-1']:.2f}x,"
            f" oncely+idem/raw {r['oncely+idem'] / r['raw']:.2f}x"
        )
    print("\nmsgs/s; every ratio is between figures measured in this run, on the same loop")


if __name__ == "__main__":
    main()
