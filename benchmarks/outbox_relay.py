"""Outbox relay throughput: rows/s published to RabbitMQ, one relay and two, in one run.

For each case it fills a fresh outbox table with ``--rows`` rows through ``Outbox.add`` (8
connections, 20 rows per transaction; that rate is printed too), then starts the relays as
``oncely outbox relay`` processes and waits until every row is marked sent. The relay rate is
measured from the database's own ``sent_at`` stamps, from the first batch's commit to the
last, so process start-up does not count:
``(rows - rows of the first batch) / (last sent_at - first sent_at)``. Each row was confirmed
by RabbitMQ before it was marked. Nothing is asserted.

The baseline (``raw``) is what the relay does minus the database: ``AmqpBroker.publish`` of
the same number of messages from this process, ``--batch`` awaited together at a time, each
confirmed. The ratios compare each case with it, measured in the same run.

    python benchmarks/outbox_relay.py [--rows 20000] [--batch 100]

Uses ``ONCELY_TEST_POSTGRES_URL`` and ``ONCELY_TEST_AMQP_URL`` (the local services by default).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiosqlite
import asyncpg  # type: ignore[import-untyped, unused-ignore]

from oncely.brokers._amqp_topology import topology
from oncely.brokers.amqp import AmqpBroker
from oncely.stores.outbox import Outbox

PG_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)
AMQP_URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[1]
PER_TX = 20


async def fill_pg(ob: Outbox, topic: str, rows: int) -> float:
    """Add ``rows`` rows from 8 connections; return rows/s."""
    pool = await asyncpg.create_pool(PG_URL, min_size=8, max_size=8)
    chunks = [range(i, min(i + PER_TX, rows)) for i in range(0, rows, PER_TX)]

    async def worker(mine: list[range]) -> None:
        async with pool.acquire() as conn:
            for chunk in mine:
                async with conn.transaction():
                    for n in chunk:
                        await ob.add(conn, topic, {"n": n, "pad": "x" * 100})

    started = time.perf_counter()
    await asyncio.gather(*(worker(chunks[i::8]) for i in range(8)))
    elapsed = time.perf_counter() - started
    await pool.close()
    return rows / elapsed


async def fill_sqlite(ob: Outbox, path: Path, topic: str, rows: int) -> float:
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        started = time.perf_counter()
        for i in range(0, rows, PER_TX):
            await conn.execute("BEGIN")
            for n in range(i, min(i + PER_TX, rows)):
                await ob.add(conn, topic, {"n": n, "pad": "x" * 100})
            await conn.execute("COMMIT")
        return rows / (time.perf_counter() - started)


def spawn(db: str, table: str, batch: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    cmd = [
        sys.executable, "-m", "oncely", "outbox", "relay", "--db", db, "--table", table,
        "--broker", AMQP_URL, "--batch", str(batch), "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


async def sent_span(ob: Outbox, db: str) -> tuple[int, int, float]:
    """(rows sent, rows of the first batch, seconds from the first batch to the last)."""
    sql = f"SELECT count(*), min(sent_at), max(sent_at) FROM {ob.table} WHERE sent_at IS NOT NULL"
    if ob.dialect == "postgresql":
        conn = await asyncpg.connect(PG_URL)
        try:
            count, first, last = await conn.fetchrow(sql)
            head = await conn.fetchval(f"SELECT count(*) FROM {ob.table} WHERE sent_at = $1", first)
        finally:
            await conn.close()
        span = (last - first).total_seconds() if count else 0.0
        return int(count), int(head or 0), span
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=30) as conn:
        count, first, last = conn.execute(sql).fetchone()
        head = conn.execute(f"SELECT count(*) FROM {ob.table} WHERE sent_at = ?", (first,))
        (head_count,) = head.fetchone()
    conn.close()
    return int(count), int(head_count), (last - first) if count else 0.0


async def one_case(db: str, relays: int, rows: int, batch: int) -> tuple[float, float]:
    table = f"bench_{uuid.uuid4().hex[:10]}"
    topic = f"bench-outbox-{uuid.uuid4().hex[:10]}"
    ob = Outbox.from_url(db, table=table)
    await ob.migrate()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if ob.dialect == "postgresql":
            add_rate = await fill_pg(ob, topic, rows)
        else:
            add_rate = await fill_sqlite(ob, Path(db.removeprefix("sqlite:///")), topic, rows)
        procs = [spawn(db, table, batch) for _ in range(relays)]
        deadline = time.monotonic() + 600
        while (await sent_span(ob, db))[0] < rows:
            if time.monotonic() > deadline:
                raise SystemExit("relays did not finish within 10 minutes")
            await asyncio.sleep(0.2)
        count, head, span = await sent_span(ob, db)
        return add_rate, (count - head) / span
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        await drop(ob)
        await delete_topology(topic)


async def drop(ob: Outbox) -> None:
    if ob.dialect == "postgresql":
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {ob.table}")
        finally:
            await conn.close()


async def delete_topology(topic: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name, _ in topology(topic, "classic"):
            await channel.queue_delete(name)


async def raw_publish(rows: int, batch: int) -> float:
    """Confirmed publishes, ``batch`` in flight at a time, no database: rows/s."""
    topic = f"bench-outbox-{uuid.uuid4().hex[:10]}"
    body = b'{"n":0,"pad":"' + b"x" * 100 + b'"}'
    try:
        async with AmqpBroker(AMQP_URL) as broker:
            await broker.publish(topic, body)  # declares the topology, as the relay's first
            started = time.perf_counter()
            for i in range(0, rows, batch):
                await asyncio.gather(
                    *(
                        broker.publish(topic, body, headers={"k": "v"}, message_id=uuid.uuid4().hex)
                        for _ in range(min(batch, rows - i))
                    )
                )
            return rows / (time.perf_counter() - started)
    finally:
        await delete_topology(topic)


async def main(args: Any) -> None:
    print(f"outbox relay -> RabbitMQ, {args.rows} rows, batch {args.batch}")
    raw = await raw_publish(args.rows, args.batch)
    print(f"raw: AmqpBroker.publish, {args.batch} in flight, no database: {raw:,.0f} msgs/s")
    print(f"{'database':<11} {'relays':>6} {'add rows/s':>11} {'relay rows/s':>13} {'/raw':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            (PG_URL, 1, "postgresql"),
            (PG_URL, 2, "postgresql"),
            (f"sqlite:///{tmp}/bench.db", 1, "sqlite"),
        ]
        for db, relays, label in cases:
            add_rate, rate = await one_case(db, relays, args.rows, args.batch)
            ratio = f"{rate / raw:.2f}x"
            print(f"{label:<11} {relays:>6} {add_rate:>11,.0f} {rate:>13,.0f} {ratio:>6}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
