"""No-op handler throughput on the embedded brokers, against a bare loop over the same broker.

For each broker (memory, SQLite) and each event loop (asyncio, uvloop) it publishes N messages,
then times, in this one process run:

- ``raw``: a bare ``consume`` loop that acks each delivery before taking the next;
- ``raw-n``: the same loop with acks in flight up to the prefetch, as the worker has them;
- ``oncely``: a Worker running a no-op at-least-once handler (heartbeat and retry policy on);
- ``oncely+idem``: the same handler effectively-once, through the broker's own store.

Rounds are interleaved (each round runs every broker, loop and consumer once, on fresh
topics) so that drift on a shared machine hits all figures alike. It prints the median msgs/s
of each figure and the median of the per-round ratios of the oncely figures to ``raw`` and
``raw-n``. Nothing is asserted: these are measurements, quoted in benchmarks/README.md.
Absolute figures vary between machines (and with their load); the ratios travel better.

    python benchmarks/throughput.py [--messages 5000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

import oncely


async def fill(url: str, topic: str, n: int) -> None:
    async with oncely.Publisher(url) as pub:
        for i in range(n):
            await pub.publish(topic, {"n": i}, key=f"k{i}")


async def raw(url: str, topic: str, n: int, concurrency: int) -> float:
    broker = oncely.broker_from_url(url)
    async with broker:
        started = time.perf_counter()
        seen = 0
        async with broker.consume(topic, prefetch=concurrency, visibility=30) as sub:
            async for delivery in sub:
                await delivery.ack()
                seen += 1
                if seen == n:
                    break
        return n / (time.perf_counter() - started)


async def raw_concurrent(url: str, topic: str, n: int, concurrency: int) -> float:
    """The bare loop with acks in flight concurrently (up to the prefetch), as the worker does,
    but no runtime: the fairest floor for the worker's own overhead."""
    broker = oncely.broker_from_url(url)
    async with broker:
        started = time.perf_counter()
        acks: set[asyncio.Task[None]] = set()
        seen = 0
        async with broker.consume(topic, prefetch=concurrency, visibility=30) as sub:
            async for delivery in sub:
                task = asyncio.create_task(delivery.ack())
                acks.add(task)
                task.add_done_callback(acks.discard)
                seen += 1
                if seen == n:
                    break
            await asyncio.gather(*acks)
        return n / (time.perf_counter() - started)


async def with_worker(
    url: str,
    topic: str,
    n: int,
    concurrency: int,
    idem: bool,
    store: str | None = None,
    *,
    transactional: bool = False,
) -> float:
    """Time a Worker running a no-op handler over ``n`` queued messages of ``topic``."""
    app = oncely.App("bench")
    done = asyncio.Event()
    count = 0

    @app.handler(topic, concurrency=concurrency, idempotent=idem, transactional=transactional)
    async def noop(_: dict[str, int]) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    worker = oncely.Worker(app, broker=url, store=store)
    started = time.perf_counter()
    await worker.start()
    await done.wait()
    # The last acks are part of the work: stop() drains them (and closes, which the raw loop
    # also pays for), so oncely is timed pessimistically.
    await worker.stop()
    elapsed = time.perf_counter() - started
    assert worker.stats.processed == n, worker.stats
    return n / elapsed


async def measure(url: str, n: int, concurrency: int) -> dict[str, float]:
    results: dict[str, float] = {}
    runs: list[tuple[str, Callable[[str], Coroutine[Any, Any, float]]]] = [
        ("raw", lambda t: raw(url, t, n, concurrency)),
        ("raw-n", lambda t: raw_concurrent(url, t, n, concurrency)),
        ("oncely", lambda t: with_worker(url, t, n, concurrency, idem=False)),
        ("oncely+idem", lambda t: with_worker(url, t, n, concurrency, idem=True)),
    ]
    for name, run in runs:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await fill(url, topic, n)
        results[name] = await run(topic)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; medians shown")
    args = parser.parse_args()
    print(
        f"{args.messages} messages, concurrency/prefetch {args.concurrency}, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    combos = [(b, loop) for b in ("memory", "sqlite") for loop in ("asyncio", "uvloop")]
    samples: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in combos}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for broker, loop in combos:
                url = (
                    f"memory://bench-{uuid.uuid4().hex[:6]}"
                    if broker == "memory"
                    else f"sqlite:///{Path(tmp) / uuid.uuid4().hex[:6]}.db"
                )
                coro = measure(url, args.messages, args.concurrency)
                samples[broker, loop].append(
                    uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
                )
    print(
        f"{'broker':<8} {'loop':<8} {'raw':>9} {'raw-n':>9} {'oncely':>9} {'/raw':>6} "
        f"{'/raw-n':>7} {'+idem':>9} {'/raw-n':>7}"
    )
    for (broker, loop), rounds in samples.items():

        def med(name: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.median(r[name] for r in rounds)

        def ratio(top: str, bottom: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.median(r[top] / r[bottom] for r in rounds)

        print(
            f"{broker:<8} {loop:<8} {med('raw'):>9,.0f} {med('raw-n'):>9,.0f} "
            f"{med('oncely'):>9,.0f} {ratio('oncely', 'raw'):>5.2f}x "
            f"{ratio('oncely', 'raw-n'):>6.2f}x {med('oncely+idem'):>9,.0f} "
            f"{ratio('oncely+idem', 'raw-n'):>6.2f}x"
        )
    print(
        "\nmsgs/s. raw: ack each delivery before the next; raw-n: acks in flight up to the "
        "prefetch.\nRatios are oncely / raw on the same broker and loop, in the same round of "
        "this run (median over rounds);\nabsolute figures vary between machines."
    )


if __name__ == "__main__":
    main()
