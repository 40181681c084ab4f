"""RabbitMQ throughput: publish pipelining, batched acks, and the Worker against two bare loops.

Against a real RabbitMQ (``ONCELY_TEST_AMQP_URL``, default the local one from
``scripts/services.sh up``), in this one process run, on asyncio and on uvloop:

- ``publish 1-by-1``: each publish awaits its confirm before the next starts;
- ``publish pipelined``: ``--in-flight`` publishes awaited concurrently on the shared channel;
- ``raw simple``: plain aio-pika (no oncely), the loop most people write: the same prefetch,
  ``async for message in queue.iterator()``, one ``ack`` per message before the next;
- ``raw careful``: plain aio-pika as a careful user writes it: the same prefetch, the body
  decoded, ``--concurrency`` handler tasks, and acks coalesced into ``basic.ack(multiple=True)``
  up to the highest tag below which every message is done;
- ``oncely``: a Worker running a no-op at-least-once handler (acks batched, the default);
- ``oncely, acks 1-by-1``: the same with ``batch_acks=0``, to show what batching buys;
- ``oncely+idem``: the handler effectively-once, through an in-process ``memory://`` store.

Every consumer is timed from before it connects until it has closed, so set-up and shutdown
count alike for all of them; the client's CPU time per message (``time.process_time``, this
process only, RabbitMQ excluded) is printed too, a figure that other load on a shared machine
disturbs less than wall-clock throughput. Rounds are interleaved (each round runs every
consumer on each loop in turn) so that drift on a shared machine hits all figures alike; the
script prints the median of each figure and of the per-round ratios. Nothing is asserted.

    python benchmarks/amqp_throughput.py [--messages 10000] [--concurrency 32] [--rounds 5]
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
import msgspec
import throughput  # the sibling script: one Worker timing for every broker
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from oncely.brokers._amqp_topology import topology
from oncely.brokers.amqp import AmqpBroker

URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
LOOPS = ("asyncio", "uvloop")


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


async def raw_simple(topic: str, n: int, concurrency: int) -> float:
    """Plain aio-pika: the same queue and prefetch, ack after each message."""
    started = time.perf_counter()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.get_queue(topic, ensure=False)
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                msgspec.json.decode(message.body)
                await message.ack()
                seen += 1
                if seen == n:
                    break
    return n / (time.perf_counter() - started)


async def raw_careful(topic: str, n: int, concurrency: int) -> float:
    """Plain aio-pika as a careful user writes it: ``concurrency`` handler tasks at the same
    prefetch, and one ``basic.ack(multiple=True)`` per event-loop turn covering every tag up to
    the highest one below which all messages are done (never a message still in a handler)."""
    started = time.perf_counter()
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=concurrency)
        raw = await channel.get_underlay_channel()
        queue = await channel.get_queue(topic, ensure=False)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        done_tags: set[int] = set()
        acked = 0  # every tag <= acked is done (tags start at 1 on a new channel)
        wake = asyncio.Event()
        all_acked = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        async def handler() -> None:
            nonlocal acked
            while True:
                message = await inbox.get()
                msgspec.json.decode(message.body)  # the no-op handler's only work
                done_tags.add(message.delivery_tag or 0)
                while acked + 1 in done_tags:
                    acked += 1
                    done_tags.discard(acked)
                wake.set()

        async def acker() -> None:
            flushed = 0
            while flushed < n:
                await wake.wait()
                wake.clear()
                if acked > flushed:
                    target = acked
                    await raw.basic_ack(target, multiple=True)
                    flushed = target
            all_acked.set()

        tasks = [asyncio.create_task(handler()) for _ in range(concurrency)]
        tasks.append(asyncio.create_task(acker()))
        tag = await queue.consume(on_message)
        await all_acked.wait()  # the last acks are part of the work
        await queue.cancel(tag)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return n / (time.perf_counter() - started)


async def with_worker(url: str, topic: str, n: int, concurrency: int, idem: bool) -> float:
    store = f"memory://bench-{uuid.uuid4().hex[:8]}" if idem else None
    return await throughput.with_worker(url, topic, n, concurrency, idem, store)


Consumer = Callable[[str], Awaitable[float]]


async def one_round(args: argparse.Namespace, first: bool) -> dict[str, float]:
    """Every figure once, on the running loop, each consumer on a freshly filled queue."""
    n, concurrency = args.messages, args.concurrency
    url = with_options(URL, queue_type="quorum") if args.quorum else URL
    unbatched = with_options(url, batch_acks=0)
    consumers: list[tuple[str, Consumer]] = [
        ("raw simple", lambda t: raw_simple(t, n, concurrency)),
        ("raw careful", lambda t: raw_careful(t, n, concurrency)),
        ("oncely", lambda t: with_worker(url, t, n, concurrency, idem=False)),
        ("oncely, acks 1-by-1", lambda t: with_worker(unbatched, t, n, concurrency, False)),
        ("oncely+idem", lambda t: with_worker(url, t, n, concurrency, idem=True)),
    ]
    results: dict[str, float] = {}
    pipelined: list[float] = []
    cpu: dict[str, float] = {}
    if first:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            results["publish 1-by-1"] = await publish_rate(url, topic, min(n, 2000), 1)
        finally:
            await delete_topology(topic)
    for name, run in consumers:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            pipelined.append(await publish_rate(url, topic, n, args.in_flight))
            before = time.process_time()
            results[name] = await run(topic)
            cpu[f"cpu {name}"] = (time.process_time() - before) / n * 1e6
        finally:
            await delete_topology(topic)
    results["publish pipelined"] = statistics.median(pipelined)
    results.update(cpu)
    return results


def run_on(loop: str, coro: Awaitable[dict[str, float]]) -> dict[str, float]:
    async def main() -> dict[str, float]:
        return await coro

    return uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())


RATIOS = (
    ("oncely / raw careful", "oncely", "raw careful"),
    ("oncely / raw simple", "oncely", "raw simple"),
    ("oncely+idem / raw careful", "oncely+idem", "raw careful"),
    ("batched / 1-by-1 acks", "oncely", "oncely, acks 1-by-1"),
    ("raw careful / raw simple", "raw careful", "raw simple"),
    ("CPU: raw careful / oncely", "cpu raw careful", "cpu oncely"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=256, help="pipelined publishes")
    parser.add_argument("--quorum", action="store_true", help="use quorum queues")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per loop; medians shown")
    args = parser.parse_args()
    kind = "quorum" if args.quorum else "classic"
    print(
        f"RabbitMQ, {kind} queues, {args.messages} messages, concurrency/prefetch "
        f"{args.concurrency}, {args.in_flight} publishes in flight, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    samples: dict[str, dict[str, list[float]]] = {loop: {} for loop in LOOPS}
    for i in range(args.rounds):
        for loop in LOOPS:
            for name, rate in run_on(loop, one_round(args, first=i == 0)).items():
                samples[loop].setdefault(name, []).append(rate)
    names = [name for name in samples["asyncio"] if not name.startswith("cpu ")]
    print(f"{'msgs/s':<26}" + "".join(f"{loop:>12}" for loop in LOOPS))
    for name in names:
        cells = "".join(f"{statistics.median(samples[loop][name]):>12,.0f}" for loop in LOOPS)
        print(f"{name:<26}{cells}")
    print(f"\n{'client CPU, us per message':<26}" + "".join(f"{loop:>12}" for loop in LOOPS))
    for name in (n for n in samples["asyncio"] if n.startswith("cpu ")):
        cells = "".join(f"{statistics.median(samples[loop][name]):>12.1f}" for loop in LOOPS)
        print(f"{name[4:]:<26}{cells}")
    print(f"\n{'median of per-round ratios':<26}" + "".join(f"{loop:>12}" for loop in LOOPS))
    for label, top, bottom in RATIOS:
        cells = ""
        for loop in LOOPS:
            s = samples[loop]
            per_round = [a / b for a, b in zip(s[top], s[bottom], strict=True)]
            cells += f"{statistics.median(per_round):>11.2f}x"
        print(f"{label:<26}{cells}")
    for loop in LOOPS:
        s = samples[loop]
        rounds = ", ".join(
            f"{a / b:.2f}" for a, b in zip(s["oncely"], s["raw careful"], strict=True)
        )
        print(f"{loop} oncely / raw careful, each round: {rounds}")
    print(
        "\nEvery ratio is between figures measured in the same round, on the same loop, in "
        "this run;\nabsolute msgs/s vary between machines and with their load."
    )


if __name__ == "__main__":
    main()
