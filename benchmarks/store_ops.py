"""What one ``begin`` + ``complete`` pair costs a store's client, with no broker in the way.

Against the services from ``scripts/services.sh up`` (URLs from ``ONCELY_TEST_*_URL``), for
each event loop, in this one process run: ``--concurrency`` tasks each run ``begin`` then
``complete`` on fresh keys until ``--pairs`` pairs are done, as a worker's handlers do. It
prints, per store, the median over ``--rounds`` interleaved rounds of pairs/s (wall) and of
this process's CPU µs per pair (the client's own cost: serialising, parsing, batching, the
driver; the servers run in other processes). Nothing is asserted.

    python benchmarks/store_ops.py [--pairs 20000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable

import uvloop

from oncely.errors import OncelyError
from oncely.stores.base import IdempotencyStore, Outcome
from oncely.stores.registry import store_from_url

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_URL = os.environ.get(
    "ONCELY_TEST_REDIS_CLUSTER_URL",
    "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002/0?cluster=1",
)
POSTGRES_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)
PREFIX = "oncely-bench:"


def _add(url: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


STORES: dict[str, Callable[[], str]] = {
    "memory": lambda: f"memory://ops-{uuid.uuid4().hex[:8]}",
    "redis": lambda: _add(REDIS_URL, prefix=PREFIX),
    "redis cluster": lambda: _add(CLUSTER_URL, prefix=PREFIX),
    "postgresql": lambda: POSTGRES_URL,
}


async def one_run(url: str, pairs: int, concurrency: int) -> tuple[float, float]:
    """(pairs/s, CPU µs per pair) for one store."""
    store: IdempotencyStore = store_from_url(url)
    run = uuid.uuid4().hex[:8]
    async with store:
        # Warm the pool's connections up, so a run times the steady state.
        await asyncio.gather(*(store.begin(f"warm-{run}-{i}", "f", 30) for i in range(64)))
        next_key = 0

        async def worker() -> None:
            nonlocal next_key
            while next_key < pairs:
                key = f"ops-{run}-{next_key}"
                next_key += 1
                begun = await store.begin(key, "fp", 30)
                assert begun.outcome is Outcome.NEW and begun.token is not None, begun
                await store.complete(key, begun.token, None, 600)

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return pairs / wall, cpu / pairs * 1e6


async def measure(args: argparse.Namespace) -> dict[str, tuple[float, float] | str]:
    samples: dict[str, list[tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, url in STORES.items():
            if (args.only and name not in args.only) or name in failed:
                continue
            try:
                samples.setdefault(name, []).append(
                    await one_run(url(), args.pairs, args.concurrency)
                )
            except OncelyError as exc:
                failed[name] = f"not available: {type(exc).__name__}: {exc}"
    result: dict[str, tuple[float, float] | str] = {
        name: (statistics.median(s[0] for s in got), statistics.median(s[1] for s in got))
        for name, got in samples.items()
    }
    result.update(failed)
    return result


async def clean() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    for client in (Redis.from_url(REDIS_URL), RedisCluster(host="127.0.0.1", port=7000)):
        async with client:
            keys = [key async for key in client.scan_iter(match=f"{PREFIX}*", count=1000)]
            for key in keys:  # one by one: on a Cluster they live in different slots
                await client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--only", action="append", default=[], choices=sorted(STORES))
    args = parser.parse_args()
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    print(
        f"{args.pairs} begin+complete pairs, {args.concurrency} concurrent callers, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    rows: dict[str, dict[str, tuple[float, float] | str]] = {}
    try:
        for loop in loops:
            coro = measure(args)
            rows[loop] = uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
    finally:
        asyncio.run(clean())
    print(f"{'':<16}" + "".join(f"{loop + ' pairs/s  CPU us/pair':>32}" for loop in loops))
    for name in STORES:
        cells = []
        for loop in loops:
            value = rows[loop].get(name)
            if isinstance(value, tuple):
                cells.append(f"{value[0]:>18,.0f}{value[1]:>14,.1f}")
            else:
                cells.append(f"{'—':>32}")
        print(f"{name:<16}" + "".join(cells))
    for row in rows.values():
        for name, value in row.items():
            if isinstance(value, str):
                print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
