"""What metrics cost: the RabbitMQ no-op benchmark with the metrics server on and scraped, vs off.

Against a real RabbitMQ (``ONCELY_TEST_AMQP_URL``, default the local one from
``scripts/services.sh up``), in this one process run, on asyncio and on uvloop, a Worker with
a no-op at-least-once handler drains ``--messages`` queued messages:

- ``off``: no server; timings off (the default: nothing reads them);
- ``on``: ``serve_http`` (timings on, the loop monitor and the health sampler running) and a
  scraper in this same process fetching ``/metrics`` every ``--scrape`` seconds over TCP, so
  the worker's loop pays for rendering every scrape, and for the client too (pessimistic: a
  real Prometheus runs elsewhere).

Rounds are interleaved (off and on alternate, on each loop) so drift on a shared machine hits
both alike; the script prints the medians of msgs/s, of the client CPU µs per message
(``time.process_time``, this process only) and of the per-round ratios on/off, and how many
scrapes the ``on`` runs answered. Nothing is asserted.

    python benchmarks/metrics_overhead.py [--messages 20000] [--concurrency 32] [--rounds 5]
                                          [--broker memory://bench]  # runtime-side cost only
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable

import amqp_throughput  # the sibling script: URL, publishing, topology clean-up
import throughput  # the sibling script: filling the embedded brokers
import uvloop

import oncely

LOOPS = ("asyncio", "uvloop")


async def scrape_every(port: int, every: float, answered: list[int]) -> None:
    while True:
        await asyncio.sleep(every)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        body = await reader.read()
        writer.close()
        if b"oncely_messages_received_total" in body:
            answered.append(1)


STEADY: dict[str, float] = {}
"""The last run's steady state, from its 10th percentile message to its last: msgs/s and CPU
us/msg with start-up and shutdown (one-off costs) left out."""


async def with_worker(
    url: str, topic: str, n: int, concurrency: int, serve: bool, every: float
) -> float:
    app = oncely.App("bench")
    done = asyncio.Event()
    count = 0
    mark = (0.0, 0.0)
    tenth = n // 10

    @app.handler(topic, concurrency=concurrency)
    async def noop(_: dict[str, int]) -> None:
        nonlocal count, mark
        count += 1
        if count == tenth:
            mark = (time.perf_counter(), time.process_time())
        elif count == n:
            wall, cpu = time.perf_counter() - mark[0], time.process_time() - mark[1]
            STEADY.update(rate=(n - tenth) / wall, cpu=cpu / (n - tenth) * 1e6)
            done.set()

    worker = oncely.Worker(app, broker=url)
    answered: list[int] = []
    scraper: asyncio.Task[None] | None = None
    started = time.perf_counter()
    await worker.start()
    if serve:
        port = await worker.serve_http(0, metrics=True)
        scraper = asyncio.create_task(scrape_every(port, every, answered))
    await done.wait()
    await worker.stop()
    elapsed = time.perf_counter() - started
    if scraper is not None:
        scraper.cancel()
        await asyncio.gather(scraper, return_exceptions=True)
        SCRAPES.append(len(answered))
    assert worker.stats.processed == n, worker.stats
    return n / elapsed


SCRAPES: list[int] = []
ROUND = [0]


async def one_round(args: argparse.Namespace) -> dict[str, float]:
    results: dict[str, float] = {}
    # Alternate which goes first, so neither always meets the other's leftovers.
    order = (("off", False), ("on", True))
    ROUND[0] += 1
    for name, serve in order if ROUND[0] % 2 else order[::-1]:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        try:
            if args.broker.startswith("amqp"):
                await amqp_throughput.publish_rate(args.broker, topic, args.messages, 256)
            else:
                await throughput.fill(args.broker, topic, args.messages)
            before = time.process_time()
            results[name] = await with_worker(
                args.broker, topic, args.messages, args.concurrency, serve, args.scrape
            )
            results[f"cpu {name}"] = (time.process_time() - before) / args.messages * 1e6
            results[f"steady {name}"] = STEADY["rate"]
            results[f"steady cpu {name}"] = STEADY["cpu"]
        finally:
            if args.broker.startswith("amqp"):
                await amqp_throughput.delete_topology(topic)
    return results


def run_on(loop: str, coro: Awaitable[dict[str, float]]) -> dict[str, float]:
    async def main() -> dict[str, float]:
        return await coro

    return uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument(
        "--broker", default=amqp_throughput.URL, help="broker URL (default: the RabbitMQ)"
    )
    args = parser.parse_args()
    print(
        f"{args.broker.split('://')[0]}, {args.messages} messages, "
        f"concurrency {args.concurrency}, no-op handler, "
        f"scraped every {args.scrape:g}s when on; median of {args.rounds} interleaved rounds\n"
    )
    samples: dict[str, dict[str, list[float]]] = {loop: {} for loop in LOOPS}
    for loop in LOOPS:  # a warm-up round on each loop, not counted (imports, first connects)
        run_on(loop, one_round(args))
    SCRAPES.clear()
    for i in range(args.rounds):
        for loop in LOOPS:
            results = run_on(loop, one_round(args))
            for name, value in results.items():
                samples[loop].setdefault(name, []).append(value)
            print(
                f"  round {i + 1} {loop}: on/off {results['on'] / results['off']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    print(f"{'':<28}" + "".join(f"{loop:>12}" for loop in LOOPS))
    rows = (
        ("msgs/s off", "off"),
        ("msgs/s on (scraped)", "on"),
        ("CPU µs/msg off", "cpu off"),
        ("CPU µs/msg on", "cpu on"),
        ("steady msgs/s off", "steady off"),
        ("steady msgs/s on", "steady on"),
        ("steady CPU µs/msg off", "steady cpu off"),
        ("steady CPU µs/msg on", "steady cpu on"),
    )
    for label, key in rows:
        cells = [statistics.median(samples[loop][key]) for loop in LOOPS]
        print(f"{label:<28}" + "".join(f"{c:>12.1f}" for c in cells))
    for label, top, bottom in (
        ("throughput on / off", "on", "off"),
        ("CPU per msg on / off", "cpu on", "cpu off"),
        ("steady throughput on / off", "steady on", "steady off"),
        ("steady CPU per msg on / off", "steady cpu on", "steady cpu off"),
    ):
        cells = []
        for loop in LOOPS:
            s = samples[loop]
            cells.append(statistics.median(a / b for a, b in zip(s[top], s[bottom], strict=True)))
        print(f"{label:<28}" + "".join(f"{c:>12.3f}" for c in cells))
    print(f"\nscrapes answered per 'on' run: median {statistics.median(SCRAPES):g}")


if __name__ == "__main__":
    main()
