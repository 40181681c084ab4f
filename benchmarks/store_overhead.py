"""What an idempotency store costs: a no-op handler on RabbitMQ, with and without each store.

Against the services from ``scripts/services.sh up`` (URLs from ``ONCELY_TEST_*_URL``), for
each event loop, in this one process run, it times a Worker draining ``--messages`` queued
messages with a no-op handler:

- ``no store``: at-least-once, the baseline;
- ``memory``, ``sqlite``, ``redis``, ``redis cluster``, ``postgresql``: effectively-once
  through that store (one ``begin`` and one ``complete`` per message, batched by the store);
- ``postgresql tx``: effectively-once in PostgreSQL's transactional mode.

Each store's msgs/s is printed with its ratio to ``no store`` on the same loop (the median of
the per-round ratios over ``--rounds`` interleaved rounds, so drift on a shared machine hits
every store alike) and this process's CPU µs per message. Keys are
fresh per run (no run finds another's completions). A store whose URL scheme is not registered,
whose driver is missing or whose server is down prints ``not available: <error>``. Nothing is
asserted.

    python benchmarks/store_overhead.py [--messages 5000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import amqp_throughput  # the sibling script: topology clean-up
import outbox_relay  # the sibling script: one relay run, timed from the database's stamps
import throughput  # the sibling script: one Worker timing for every broker
import uvloop

from oncely.brokers.amqp import AmqpBroker
from oncely.errors import OncelyError
from oncely.stores.registry import store_from_url

AMQP_URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("ONCELY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_URL = os.environ.get(
    "ONCELY_TEST_REDIS_CLUSTER_URL",
    "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002/0?cluster=1",
)
POSTGRES_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)
BENCH_PREFIX = "oncely-bench:"
"""Redis key prefix of every run, deleted at the end."""


@dataclass(frozen=True)
class Row:
    rate: float
    """msgs/s, median over the rounds."""
    ratio: float | None
    """Median over the rounds of rate / the same round's ``no store`` rate."""
    cpu_us: float
    """This process's CPU µs per message, median over the rounds."""
    servers_us: float | None = None
    """The local servers' CPU µs per message (``servers_cpu``), median over the rounds."""


@dataclass(frozen=True)
class Variant:
    name: str
    store: Callable[[Path], str | None]
    """The store URL for one run (fresh keys per run come from fresh topics)."""
    transactional: bool = False


def _add(url: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


VARIANTS = [
    Variant("no store", lambda _: None),
    Variant("memory", lambda _: f"memory://bench-{uuid.uuid4().hex[:8]}"),
    Variant("sqlite", lambda tmp: f"sqlite:///{tmp / uuid.uuid4().hex[:8]}.db"),
    Variant("redis", lambda _: _add(REDIS_URL, prefix=BENCH_PREFIX)),
    Variant("redis cluster", lambda _: _add(CLUSTER_URL, prefix=BENCH_PREFIX)),
    Variant("postgresql", lambda _: POSTGRES_URL),
    Variant("postgresql tx", lambda _: POSTGRES_URL, transactional=True),
]


async def outbox_relay_rate(args: argparse.Namespace) -> dict[str, str]:
    """One `oncely outbox relay` process publishing PostgreSQL outbox rows to RabbitMQ."""
    rows = args.messages
    _, rate = await outbox_relay.one_case(POSTGRES_URL, relays=1, rows=rows, batch=100)
    return {f"outbox relay (postgresql, 1 relay, {rows} rows, batch 100)": f"{rate:,.0f} rows/s"}


EXTRA_FIGURES: list[Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, str]]]] = [
    outbox_relay_rate
]
"""More figures for the same run, each ``{label: printed value}``."""


def availability(tmp: Path) -> dict[str, str]:
    """``{variant: reason}`` for every store that cannot be built from its URL here."""
    missing: dict[str, str] = {}
    for variant in VARIANTS:
        url = variant.store(tmp)
        if url is None:
            continue
        try:
            store = store_from_url(url)
        except OncelyError as exc:
            missing[variant.name] = f"{type(exc).__name__}: {exc}"
            continue
        if variant.transactional and not hasattr(store, "transaction"):
            missing[variant.name] = f"{type(store).__name__} has no transactional mode"
    return missing


async def fill(topic: str, n: int, in_flight: int = 256) -> None:
    """Queue ``n`` messages with keys unique to ``topic``, confirms pipelined."""
    async with AmqpBroker(AMQP_URL) as broker:
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                await broker.publish(
                    topic, b'{"n": %d}' % i, headers={"oncely-key": f"{topic}:{i}"}
                )

        await asyncio.gather(*(one(i) for i in range(n)))


SERVERS = ("beam.smp", "redis-server", "postgres")
"""The server processes whose CPU a round is charged (RabbitMQ, Redis, PostgreSQL)."""


def servers_cpu() -> float | None:
    """CPU seconds used so far by this machine's RabbitMQ, Redis and PostgreSQL processes,
    or None without ``/proc``. The client and these servers share the machine's cores, so a
    store's cost is its client CPU plus its server's. Exited PostgreSQL backends count
    through their parent's reaped-children times."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    seen: dict[str, tuple[str, str, list[str]]] = {}  # pid -> (name, parent, fields)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        if name in SERVERS:
            fields = rest.split()
            seen[entry.name] = (name, fields[1], fields)
    total = 0
    for name, parent, fields in seen.values():
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if name == "postgres" and parent not in seen:  # the postmaster: its reaped backends
            total += int(fields[13]) + int(fields[14])
    return total / tick


async def measure(
    args: argparse.Namespace, tmp: Path, skip: dict[str, str]
) -> dict[str, Row | str]:
    """``{variant: Row}``: medians over the rounds of msgs/s, of the ratio to ``no store`` in
    the same round, and of this process's CPU µs per message (client CPU: less disturbed by
    other load on the machine than wall time)."""
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    servers: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        base: float | None = None
        for variant in VARIANTS:
            if variant.name in skip or variant.name in failed:
                continue
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            try:
                await fill(topic, args.messages)
                store = variant.store(tmp)
                cpu = time.process_time()
                served = servers_cpu()
                rate = await throughput.with_worker(
                    AMQP_URL,
                    topic,
                    args.messages,
                    args.concurrency,
                    idem=store is not None,
                    store=store,
                    transactional=variant.transactional,
                )
                cpu = time.process_time() - cpu
                if served is not None and (after := servers_cpu()) is not None:
                    served = after - served
                    servers.setdefault(variant.name, []).append(served / args.messages * 1e6)
                rates.setdefault(variant.name, []).append(rate)
                cpus.setdefault(variant.name, []).append(cpu / args.messages * 1e6)
                if store is None:
                    base = rate
                elif base is not None:
                    ratios.setdefault(variant.name, []).append(rate / base)
            except OncelyError as exc:  # e.g. a store server that is down
                failed[variant.name] = f"{type(exc).__name__}: {exc}"
            finally:
                await amqp_throughput.delete_topology(topic)
    results: dict[str, Row | str] = {
        name: Row(
            statistics.median(r),
            statistics.median(ratios[name]) if name in ratios else None,
            statistics.median(cpus[name]),
            statistics.median(servers[name]) if name in servers else None,
        )
        for name, r in rates.items()
    }
    results.update({name: f"not available: {why}" for name, why in (skip | failed).items()})
    return results


async def clean_redis() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    for client in (Redis.from_url(REDIS_URL), RedisCluster(host="127.0.0.1", port=7000)):
        async with client:
            keys = [key async for key in client.scan_iter(match=f"{BENCH_PREFIX}*", count=1000)]
            for key in keys:  # one by one: on a Cluster they live in different slots
                await client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; medians shown")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="STORE",
        help="time only this store (repeatable); 'no store' always runs",
    )
    args = parser.parse_args()
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    print(
        f"RabbitMQ, {args.messages} messages, no-op handler, concurrency/prefetch "
        f"{args.concurrency}, median of {args.rounds} interleaved rounds\n"
    )
    rows: dict[str, dict[str, Row | str]] = {}
    with tempfile.TemporaryDirectory(prefix="oncely-bench-") as tmp:
        skip = availability(Path(tmp))
        if args.only:
            known = {v.name for v in VARIANTS}
            if unknown := set(args.only) - known:
                parser.error(f"unknown store(s) {sorted(unknown)}; known: {sorted(known)}")
            skip |= {
                v.name: "left out (--only)"
                for v in VARIANTS
                if v.name != "no store" and v.name not in args.only
            }
        try:
            for loop in loops:
                coro = measure(args, Path(tmp), skip)
                rows[loop] = uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
        finally:
            if "redis" not in skip:
                asyncio.run(clean_redis())
    head = " msgs/s (ratio) CPU us/msg servers"
    print(f"{'':<16}" + "".join(f"{loop + head:>44}" for loop in loops))
    for variant in VARIANTS:
        cells = []
        for loop in loops:
            row = rows[loop].get(variant.name)
            if isinstance(row, Row):
                ratio = "" if row.ratio is None else f" ({row.ratio:.2f}x)"
                servers = "" if row.servers_us is None else f"{row.servers_us:,.0f}"
                cells.append(f"{row.rate:>13,.0f}{ratio:>9}{row.cpu_us:>14,.0f}{servers:>8}")
            else:
                cells.append(f"{'—':>44}")
        print(f"{variant.name:<16}" + "".join(cells))
    notes = {name: v for row in rows.values() for name, v in row.items() if isinstance(v, str)}
    for name, why in notes.items():
        print(f"  {name}: {why}")
    for extra in EXTRA_FIGURES:
        for label, value in asyncio.run(extra(args)).items():
            print(f"{label}: {value}")
    print(
        "\nmsgs/s and CPU us/msg of this process: medians over the rounds; ratios: median of "
        "the per-round ratios to 'no store' on the same loop, measured in this run; servers: "
        "CPU us/msg of this machine's RabbitMQ, Redis and PostgreSQL processes meanwhile "
        "(everything they did, other clients' work included)"
    )


if __name__ == "__main__":
    main()
