"""The outbox end to end on PostgreSQL and RabbitMQ: relay processes (`oncely outbox relay`),
a real SIGKILL mid-batch, per-key order at a consumer, and a broker outage behind a TCP fault
proxy (the shared RabbitMQ itself is never stopped).

The consumer is an oncely Worker whose effectively-once handler records effects; the figures
(duplicates delivered and absorbed) are printed in the run's summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiosqlite
import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

import oncely
from oncely.stores.outbox import Outbox, OutboxRelay
from tests.brokers.test_amqp import delete_topology
from tests.stores._outbox_support import AMQP_URL, PG_URL, FaultProxy, drop, table_name

pytestmark = [pytest.mark.anyio, pytest.mark.amqp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # Multi-process and minute-long: once, on asyncio (the relay processes pick uvloop).
    return ("asyncio", {"use_uvloop": False})


@pytest.fixture
async def outbox(unique: str) -> AsyncIterator[Outbox]:
    ob = Outbox.from_url(PG_URL, table=table_name())
    await ob.migrate()
    try:
        yield ob
    finally:
        await drop(ob)


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def until(cond: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


async def add_rows(ob: Outbox, rows: list[tuple[str, dict[str, Any], str | None]]) -> None:
    """Add ``(topic, payload, key)`` rows, 20 per transaction."""
    conn = await asyncpg.connect(PG_URL)
    try:
        for i in range(0, len(rows), 20):
            async with conn.transaction():
                for topic, payload, key in rows[i : i + 20]:
                    await ob.add(conn, topic, payload, key=key)
    finally:
        await conn.close()


async def scalar(sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(PG_URL)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def queue_depth(topic: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topic, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)


def spawn_relay(ob: Outbox, batch: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable, "-m", "oncely", "outbox", "relay", "--db", PG_URL,
        "--table", ob.table, "--broker", AMQP_URL, "--batch", str(batch),
        "--poll", "0.2", "--log-level", "INFO",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)


def spawn_victim(ob: Outbox, batch: int, confirm: int) -> subprocess.Popen[bytes]:
    """``tests/stores/outbox_victim.py``: a relay that stalls after ``confirm`` publishes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [
        sys.executable, "-m", "tests.stores.outbox_victim", PG_URL, ob.table, AMQP_URL,
        str(batch), str(confirm),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE)


def reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def sigterm(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()


def consumer(
    topic: str, effects: Counter[Any], *, key: str, concurrency: int
) -> tuple[oncely.App, list[tuple[str, int]]]:
    """An app whose effectively-once handler counts effects (and records keyed arrivals)."""
    app = oncely.App("outbox-consumer")
    order: list[tuple[str, int]] = []

    @app.handler(topic, idempotent=True, key=key, concurrency=concurrency)
    async def effect(payload: dict[str, Any]) -> None:
        effects[payload["n"] if "n" in payload else (payload["key"], payload["seq"])] += 1
        if "seq" in payload:
            order.append((payload["key"], payload["seq"]))

    return app, order


async def test_two_relay_processes_one_sigkilled_mid_batch_every_row_once_at_the_consumer(
    outbox: Outbox, topic: str, unique: str, report: Callable[[str], None]
) -> None:
    rows = 4000
    await add_rows(outbox, [(topic, {"n": n}, None) for n in range(rows)])
    effects: Counter[Any] = Counter()
    app, _ = consumer(topic, effects, key="auto", concurrency=16)
    procs: list[subprocess.Popen[bytes]] = []
    sent = f"SELECT count(*) FROM {outbox.table} WHERE sent_at IS NOT NULL"
    async with oncely.Worker(app, broker=AMQP_URL, store=f"memory://{unique}") as worker:
        try:
            procs = [spawn_relay(outbox, batch=50) for _ in range(2)]
            victim = procs[0]
            mid_batch = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                " AND state = 'idle in transaction'"
            )
            name = f"oncely-outbox-relay:{victim.pid}"

            async def victim_holds_a_batch_after_a_tenth() -> bool:
                # Idle in its claim transaction: publishing the batch it holds.
                return await scalar(sent) >= rows // 10 and await scalar(mid_batch, name) > 0

            await until(victim_holds_a_batch_after_a_tenth, 120, "the victim mid-batch")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            sent_at_kill = await scalar(sent)

            async def all_sent() -> bool:
                return await scalar(sent) == rows

            await until(all_sent, 120, "every row sent by the survivor")
            sigterm(procs[1])

            async def consumer_drained() -> bool:
                s = worker.stats
                settled = s.processed + s.duplicates + s.dead_lettered
                return (
                    len(effects) == rows
                    and s.received == settled
                    and (await queue_depth(topic) == 0)
                )

            await until(consumer_drained, 120, "the consumer to drain")
        finally:
            reap(procs)
    stats = worker.stats
    report(
        f"[outbox kill] {rows} rows, 2 relays, one SIGKILLed mid-batch after "
        f"{sent_at_kill} were marked sent: {stats.received} deliveries, {stats.processed} "
        f"effects, duplicates delivered and absorbed {stats.duplicates}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert sorted(effects) == list(range(rows))
    assert set(effects.values()) == {1}
    assert stats.processed == rows and stats.dead_lettered == 0
    assert stats.received == rows + stats.duplicates + stats.deferred


async def test_a_relay_killed_between_confirm_and_mark_publishes_again_with_the_same_ids(
    outbox: Outbox, topic: str, unique: str, report: Callable[[str], None]
) -> None:
    """Deterministic: the victim's second batch of 50 has exactly 25 rows confirmed by
    RabbitMQ and none marked when it is killed, so exactly 25 duplicates reach the consumer,
    which absorbs them."""
    rows, batch, confirm = 1000, 50, 75
    await add_rows(outbox, [(topic, {"n": n}, None) for n in range(rows)])
    effects: Counter[Any] = Counter()
    app, _ = consumer(topic, effects, key="auto", concurrency=16)
    procs: list[subprocess.Popen[bytes]] = []
    async with oncely.Worker(app, broker=AMQP_URL, store=f"memory://{unique}") as worker:
        try:
            victim = spawn_victim(outbox, batch, confirm)
            procs.append(victim)
            assert victim.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(victim.stdout.readline), 60)
            assert line.strip() == b"CONFIRMED"
            procs.append(spawn_relay(outbox, batch=batch))
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)

            async def all_effects() -> bool:
                s = worker.stats
                settled = s.processed + s.duplicates + s.dead_lettered
                return (
                    len(effects) == rows
                    and s.duplicates >= confirm - batch
                    and s.received == settled + s.deferred
                    and await queue_depth(topic) == 0
                )

            await until(all_effects, 60, "every row and every duplicate at the consumer")
            sigterm(procs[1])
        finally:
            reap(procs)
    stats = worker.stats
    report(
        f"[outbox confirm-then-kill] {rows} rows; a relay killed with {confirm - batch} rows "
        f"confirmed but unmarked: {stats.processed} effects, {stats.duplicates} duplicates "
        "absorbed"
    )
    assert sorted(effects) == list(range(rows)) and set(effects.values()) == {1}
    assert stats.duplicates == confirm - batch
    assert stats.processed == rows and stats.dead_lettered == 0


async def test_per_key_order_at_the_consumer_with_two_relay_processes(
    outbox: Outbox, topic: str, unique: str, report: Callable[[str], None]
) -> None:
    # Few keys, so every batch holds several rows of each and the relays' claims collide.
    keys, per_key = 8, 100
    rows: list[tuple[str, dict[str, Any], str | None]] = [
        (topic, {"key": f"k{i % keys}", "seq": i // keys}, f"k{i % keys}")
        for i in range(keys * per_key)
    ]
    effects: Counter[Any] = Counter()
    # Several messages per key, and the default key source: it dedupes each row (its
    # oncely-dedupe-key), not the key they share.
    app, order = consumer(topic, effects, key="auto", concurrency=1)
    procs: list[subprocess.Popen[bytes]] = []
    async with oncely.Worker(app, broker=AMQP_URL, store=f"memory://{unique}") as worker:
        try:
            # A backlog, then more added while both relays run, in small transactions.
            await add_rows(outbox, rows[: len(rows) // 2])
            procs = [spawn_relay(outbox, batch=20) for _ in range(2)]
            for p in procs:  # both claim, and both can take the SIGTERM at the end
                await until_started(p)
            await add_rows(outbox, rows[len(rows) // 2 :])

            async def all_consumed() -> bool:
                return len(effects) == len(rows)

            await until(all_consumed, 120, "every row at the consumer")
            for p in procs:
                sigterm(p)
        finally:
            reap(procs)
    by_key: dict[str, list[int]] = {}
    for key, seq in order:
        by_key.setdefault(key, []).append(seq)
    withheld = await scalar(f"SELECT count(*) FROM {outbox.table} WHERE attempts > 1")
    report(
        f"[outbox order] {len(rows)} rows over {keys} keys, 2 relay processes: "
        f"{worker.stats.processed} effects, {worker.stats.duplicates} duplicates absorbed, "
        f"{withheld} rows took more than one attempt"
    )
    assert by_key == {f"k{k}": list(range(per_key)) for k in range(keys)}
    assert set(effects.values()) == {1}


async def test_a_relay_pauses_through_a_broker_outage_and_resumes(
    outbox: Outbox, topic: str, unique: str, report: Callable[[str], None]
) -> None:
    target = urlsplit(AMQP_URL)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await proxy.start()
    via_proxy = AMQP_URL.replace(
        f"{target.hostname}:{target.port or 5672}", f"127.0.0.1:{proxy.listen_port}"
    )
    via_proxy += "&" if "?" in via_proxy else "?"
    via_proxy += "publish_timeout=2"
    rows = 1500
    await add_rows(outbox, [(topic, {"n": n}, f"k{n % 7}") for n in range(rows)])
    effects: Counter[Any] = Counter()
    app, _ = consumer(topic, effects, key="message_id", concurrency=16)
    relay = OutboxRelay(
        Outbox.from_url(PG_URL, table=outbox.table),
        via_proxy,
        batch=50,
        poll=0.2,
        publish_timeout=2.0,
        retry_base=0.1,
        retry_cap=1.0,
    )
    sent = f"SELECT count(*) FROM {outbox.table} WHERE sent_at IS NOT NULL"
    try:
        async with oncely.Worker(app, broker=AMQP_URL, store=f"memory://{unique}") as worker:
            async with relay:

                async def a_quarter_sent() -> bool:
                    return relay.stats.published >= rows // 4

                await until(a_quarter_sent, 120, "a quarter of the rows")
                proxy.cut()
                cut_at = relay.stats.published

                async def relay_failing() -> bool:
                    return relay.stats.failed + relay.stats.errors >= 3

                await until(relay_failing, 60, "the relay to notice the outage")
                during = await scalar(sent)
                proxy.restore()

                async def all_sent() -> bool:
                    return await scalar(sent) == rows

                await until(all_sent, 120, "every row after the outage")

            async def consumed() -> bool:
                return len(effects) == rows and await queue_depth(topic) == 0

            await until(consumed, 120, "the consumer to drain")
    finally:
        await proxy.aclose()
    report(
        f"[outbox outage] {rows} rows; broker cut after {cut_at} published, "
        f"{during} marked sent while cut; {relay.stats.failed} failed publishes retried; "
        f"{worker.stats.duplicates} duplicates absorbed; all {rows} delivered"
    )
    assert sorted(effects) == list(range(rows)) and set(effects.values()) == {1}
    assert relay.stats.published >= rows and relay.stats.failed > 0


async def test_sqlite_two_relay_processes_one_file_for_everything(
    tmp_path: Path, unique: str, report: Callable[[str], None]
) -> None:
    """The embedded default: business rows, outbox and queue in one SQLite file, two relay
    processes, a worker with concurrency 1. Every row arrives once, each key in order."""
    db = f"sqlite:///{tmp_path / 'app.db'}"
    ob = Outbox.from_url(db, table=table_name())
    await ob.migrate()
    keys, per_key = 4, 60
    effects: Counter[Any] = Counter()
    app, order = consumer("events", effects, key="auto", concurrency=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    cmd = [
        sys.executable, "-m", "oncely", "outbox", "relay", "--db", db, "--table", ob.table,
        "--broker", db, "--batch", "10", "--poll", "0.05", "--log-level", "INFO",
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    async with oncely.Worker(app, broker=db, store=f"memory://{unique}") as worker:
        try:
            procs = [start_process(cmd, env) for _ in range(2)]
            # Both relays up before any row: one alone may publish everything while the
            # other still imports, and the SIGTERM below would then find it unprepared.
            for p in procs:
                await until_started(p)
            conn = await aiosqlite.connect(tmp_path / "app.db", isolation_level=None, timeout=30)
            try:
                for i in range(0, keys * per_key, 8):
                    await conn.execute("BEGIN IMMEDIATE")
                    for n in range(i, i + 8):
                        key = f"k{n % keys}"
                        await ob.add(conn, "events", {"key": key, "seq": n // keys}, key=key)
                    await conn.execute("COMMIT")
            finally:
                await conn.close()

            async def all_consumed() -> bool:
                return len(effects) == keys * per_key

            await until(all_consumed, 120, "every row at the consumer")
            for p in procs:
                sigterm(p)
        finally:
            reap(procs)
    by_key: dict[str, list[int]] = {}
    for key, seq in order:
        by_key.setdefault(key, []).append(seq)
    report(
        f"[outbox sqlite] {keys * per_key} rows over {keys} keys, 2 relay processes on one "
        f"file: {worker.stats.processed} effects, {worker.stats.duplicates} duplicates"
    )
    assert by_key == {f"k{k}": list(range(per_key)) for k in range(keys)}
    assert set(effects.values()) == {1}


async def until_started(proc: subprocess.Popen[bytes], within: float = 60.0) -> None:
    """Read the relay's stderr (``--log-level INFO``) up to its start line."""
    assert proc.stderr is not None
    async with asyncio.timeout(within):
        while True:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                raise AssertionError(f"relay exited before it started: {proc.wait()}")
            if b"outbox relay started" in line:
                return


def start_process(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)
