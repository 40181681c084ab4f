"""Across pods, end to end on RabbitMQ: three `oncely run` processes share one queue and one
idempotency store server; one of them is SIGKILLed mid-run.

2,000 keys are each published 3 times. With PostgreSQL transactional mode the effect table ends
with exactly 2,000 rows. With a plain store (PostgreSQL, Redis) the crash window shows: an
effect the killed worker committed before recording completion runs again. The figures go to
the run's summary (the ``report`` fixture); README quotes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

import oncely
from oncely.brokers._amqp_topology import dlq_name, topology

pytestmark = [pytest.mark.slow, pytest.mark.amqp]

ROOT = Path(__file__).resolve().parents[2]
AMQP_URL = os.environ.get("ONCELY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get(
    "ONCELY_TEST_POSTGRES_URL", "postgresql://oncely:oncely@127.0.0.1:5432/oncely"
)
REDIS_URL = os.environ.get("ONCELY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KEYS = 2000
COPIES = 3
WORKERS = 3
CONCURRENCY = 8  # the handler's, in tests/runtime/e2e_pods_app.py


def pg(query: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(PG_URL)
        try:
            rows: list[Any] = await conn.fetch(query, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def ready(topic: str) -> dict[str, int]:
    """Ready messages per queue of ``topic`` (work queue, delay buckets, dead letters)."""

    async def run() -> dict[str, int]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            counts = {}
            for name, _ in topology(topic, "classic"):
                queue = await channel.declare_queue(name, passive=True)
                counts[name] = queue.declaration_result.message_count or 0
            return counts

    return asyncio.run(run())


def delete_topology(topic: str) -> None:
    async def run() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for name, _ in topology(topic, "classic"):
                await channel.queue_delete(name)

    asyncio.run(run())


def wait_for(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.1)


def publish_all(topic: str, payloads: list[dict[str, str]]) -> None:
    async def run() -> None:
        async with oncely.Publisher(AMQP_URL) as pub:
            for start in range(0, len(payloads), 200):
                chunk = payloads[start : start + 200]
                await asyncio.gather(*(pub.publish(topic, p) for p in chunk))

    asyncio.run(run())


@contextmanager
def workers(store: str, env: dict[str, str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    cmd = [
        sys.executable, "-m", "oncely", "run", "tests.runtime.e2e_pods_app:app",
        "--broker", AMQP_URL, "--store", store, "--handler", "effect",
        "--log-level", "ERROR", "--grace", "10",
    ]  # fmt: skip
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full = {k: v for k, v in full.items() if not k.startswith("ONCELY_")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(WORKERS):
            procs.append(subprocess.Popen(cmd, env=full, cwd=ROOT, stderr=subprocess.PIPE))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            if p.stderr is not None:
                p.stderr.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def died(procs: list[subprocess.Popen[bytes]]) -> bool:
    """Fail at once, with its stderr, if a worker that should be running exited."""
    for p in procs:
        if p.poll() is not None:
            _, err = p.communicate(timeout=5)
            raise AssertionError(f"worker {p.pid} exited with {p.returncode}:\n{err.decode()}")
    return False


@pytest.fixture
def names(unique: str) -> Iterator[tuple[str, str, str]]:
    """The topic, the effects table and the store table of this run; removed afterwards."""
    slug = unique.replace("-", "_")
    topic, effects, table = f"e2e-pods-{unique}", f"e2e_effects_{slug}", f"oncely_e2e_{slug}"
    pg(f"CREATE TABLE {effects} (key text NOT NULL, pid integer NOT NULL)")
    yield topic, effects, table
    delete_topology(topic)
    pg(f"DROP TABLE IF EXISTS {effects}")
    pg(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.parametrize(
    ("store", "mode"),
    [("postgres", "transactional"), ("postgres", "plain"), ("redis", "plain")],
    ids=["postgres-transactional", "postgres-plain", "redis-plain"],
)
def test_2000_keys_3_copies_3_pods_one_sigkilled(
    names: tuple[str, str, str], unique: str, store: str, mode: str, report: Callable[[str], None]
) -> None:
    topic, effects, table = names
    store_url = f"{PG_URL}?table={table}&pool_max=12" if store == "postgres" else REDIS_URL
    # Unique keys: a long-lived Redis or PostgreSQL may remember an earlier run's.
    payloads = [{"key": f"{unique}-{n}"} for n in range(KEYS)] * COPIES
    publish_all(topic, payloads)
    env = {
        "E2E_TOPIC": topic,
        "E2E_MODE": mode,
        "E2E_PG": PG_URL,
        "E2E_EFFECTS": effects,
        "E2E_SLOW": "0.005",
    }

    def rows() -> int:
        return int(pg(f"SELECT count(*) FROM {effects}")[0][0])

    def drained() -> bool:
        done = int(pg(f"SELECT count(DISTINCT key) FROM {effects}")[0][0]) == KEYS
        return done and not any(ready(topic).values())

    started = time.monotonic()
    with workers(store_url, env) as procs:
        wait_for(lambda: died(procs) or rows() >= KEYS // 3, 120, "a third of the effects")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        by_killed = f"SELECT count(*) FROM {effects} WHERE pid = $1"
        killed_effects = int(pg(by_killed, procs[0].pid)[0][0])
        # Drained: every key has its effect and no queue holds a message, twice in a row
        # (the second look catches a redelivery that was in flight at the first).
        wait_for(lambda: died(procs[1:]) or (drained() and drained()), 240, "the queue to drain")
        for p in procs[1:]:
            stop(p)
    elapsed = time.monotonic() - started
    total = rows()
    keys = int(pg(f"SELECT count(DISTINCT key) FROM {effects}")[0][0])
    left = ready(topic)
    dead = left.pop(dlq_name(topic))
    duplicate_effects = total - keys
    deliveries = KEYS * COPIES
    report(
        f"[e2e pods {store} {mode}] {deliveries} deliveries of {KEYS} keys on RabbitMQ in "
        f"{elapsed:.1f}s, {WORKERS} workers, 1 SIGKILLed after {killed_effects} of its effects: "
        f"{total} effect rows, {keys} keys, duplicate effects {duplicate_effects}, "
        f"duplicate deliveries absorbed >= {deliveries - total}, dead letters {dead}"
    )
    assert keys == KEYS
    assert dead == 0
    assert not any(left.values()), left
    if mode == "transactional":
        # The effect and the completion commit in one PostgreSQL transaction.
        assert total == KEYS
    else:
        # The crash window: effects the killed worker committed before recording their
        # completion ran again. At most what it had in flight: its concurrency.
        assert 0 <= duplicate_effects <= CONCURRENCY
