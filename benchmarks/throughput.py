"""No-op handler throughput on the embedded brokers, against a bare loop over the same broker.

For each broker (memory, SQLite) and each event loop (asyncio, uvloop) it publishes N messages,
then times, in this one process run:

- ``raw``: a bare ``consume`` loop that acks each delivery before taking the next;
- ``raw-n``: the same loop with acks in flight up to the prefetch, as the worker has them;
- ``oncely``: a Worker running a no-op at-least-once handler (heartbeat and retry policy on);
- ``oncely+idem``: the same handler effectively-once, through the broker's own store.

It prints msgs/s and the oncely figures as ratios of ``raw`` and ``raw-n``. Nothing is
asserted: these are measurements, quoted in benchmarks/README.md.

    python benchmarks/throughput.py [--messages 5000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
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
    args = parser.parse_args()
    print(f"{args.messages} messages, concurrency/prefetch {args.concurrency}\n")
    print(
        f"{'broker':<8} {'loop':<8} {'raw':>9} {'raw-n':>9} {'oncely':>9} {'/raw':>6} "
        f"{'/raw-n':>7} {'+idem':>9} {'/raw-n':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for broker in ("memory", "sqlite"):
            for loop in ("asyncio", "uvloop"):
                url = (
                    f"memory://bench-{uuid.uuid4().hex[:6]}"
                    if broker == "memory"
                    else f"sqlite:///{Path(tmp) / uuid.uuid4().hex[:6]}.db"
                )
                coro = measure(url, args.messages, args.concurrency)
                r = uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
                print(
                    f"{broker:<8} {loop:<8} {r['raw']:>9,.0f} {r['raw-n']:>9,.0f} "
                    f"{r['oncely']:>9,.0f} {r['oncely'] / r['raw']:>5.2f}x "
                    f"{r['oncely'] / r['raw-n']:>6.2f}x {r['oncely+idem']:>9,.0f} "
                    f"{r['oncely+idem'] / r['raw-n']:>6.2f}x"
                )
    print(
        "\nmsgs/s. raw: ack each delivery before the next; raw-n: acks in flight up to the "
        "prefetch.\nRatios are oncely / raw on the same broker and loop, measured in this run."
    )


if __name__ == "__main__":
    main()
