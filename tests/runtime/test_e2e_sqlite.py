"""End to end on the embedded default: real worker processes (`oncely run`), real SIGKILLs.

The figures these tests print (duplicates absorbed, duplicate effects let through) are quoted
in README; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import oncely

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEYS = 2000
COPIES = 3


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def wait_for(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def make_db(tmp_path: Path) -> Path:
    db = tmp_path / "e2e.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        # No unique constraint: a duplicate effect shows up as a second row.
        conn.execute("CREATE TABLE effects(key TEXT, pid INTEGER, attempt INTEGER)")
    return db


@contextmanager
def workers(
    db: Path, n: int, handler: str, extra_env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    url = f"sqlite:///{db}"
    env = {**os.environ, "E2E_DB": str(db), "PYTHONPATH": str(ROOT), **(extra_env or {})}
    env = {k: v for k, v in env.items() if not k.startswith("ONCELY_")}
    try:
        for _ in range(n):
            procs.append(spawn(url, handler, env))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            if p.stderr is not None:
                p.stderr.close()


def spawn(url: str, handler: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "oncely", "run", "tests.runtime.e2e_app:app",
        "--broker", url, "--handler", handler, "--log-level", "ERROR", "--grace", "10",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def pending(db: Path) -> int:
    (row,) = query(db, "SELECT COUNT(*) FROM oncely_messages")
    return int(str(row[0]))


def publish_all(db: Path, topic: str, payloads: list[dict[str, str]]) -> None:
    asyncio.run(_publish_all(db, topic, payloads))


async def _publish_all(db: Path, topic: str, payloads: list[dict[str, str]]) -> None:
    async with oncely.Publisher(f"sqlite:///{db}") as pub:
        for p in payloads:
            await pub.publish(topic, p)


def test_sigkilled_handler_is_redelivered_to_another_worker(tmp_path: Path) -> None:
    db = make_db(tmp_path)
    publish_all(db, "hold", [{"key": "k1"}])
    with workers(db, 1, "hold", {"E2E_BLOCK": "1"}) as (first,):
        wait_for(lambda: bool(query(db, "SELECT 1 FROM effects")), 30, "the first run")
        with workers(db, 1, "hold") as (second,):
            # The heartbeat keeps extending the 2 s visibility, so while the first worker
            # lives the second never sees the message (two and a half windows of watching).
            time.sleep(5.0)
            assert query(db, "SELECT pid, attempt FROM effects") == [(first.pid, 1)]
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            wait_for(lambda: len(query(db, "SELECT 1 FROM effects")) == 2, 30, "redelivery")
            runs = query(db, "SELECT pid, attempt FROM effects ORDER BY rowid")
            assert runs == [(first.pid, 1), (second.pid, 2)]
            wait_for(lambda: pending(db) == 0, 30, "the ack")
            stop(second)


@pytest.mark.parametrize("mode", ["transactional", "plain"])
def test_2000_keys_published_3_times_3_workers_one_killed(
    tmp_path: Path, mode: str, report: Callable[[str], None]
) -> None:
    db = make_db(tmp_path)
    payloads = [{"key": f"k{n}"} for n in range(KEYS)] * COPIES
    publish_all(db, "e2e", payloads)
    env = {"E2E_MODE": mode, "E2E_SLOW": "0.005"}
    started = time.monotonic()
    with workers(db, 3, "effect", env) as procs:
        wait_for(
            lambda: int(str(query(db, "SELECT COUNT(*) FROM effects")[0][0])) >= KEYS // 3,
            120,
            "a third of the effects",
        )
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        wait_for(lambda: pending(db) == 0, 240, "the queue to drain")
        for p in procs[1:]:
            stop(p)
    elapsed = time.monotonic() - started
    rows = int(str(query(db, "SELECT COUNT(*) FROM effects")[0][0]))
    keys = int(str(query(db, "SELECT COUNT(DISTINCT key) FROM effects")[0][0]))
    dead = int(str(query(db, "SELECT COUNT(*) FROM oncely_dead_letters")[0][0]))
    duplicate_effects = rows - keys
    deliveries = KEYS * COPIES
    report(
        f"[e2e {mode}] {deliveries} deliveries of {KEYS} keys in {elapsed:.1f}s, "
        f"3 workers, 1 SIGKILLed: {rows} effect rows, {keys} keys, "
        f"duplicate effects {duplicate_effects}, "
        f"duplicate deliveries absorbed >= {deliveries - rows}, dead letters {dead}"
    )
    assert keys == KEYS
    assert dead == 0
    if mode == "transactional":
        # The effect and the completion commit together: no crash window.
        assert rows == KEYS
    else:
        # The plain store's crash window: an effect committed by the killed worker before it
        # recorded completion runs again after the lease expires. Bounded by what was in
        # flight in the killed worker (concurrency 8).
        assert 0 <= duplicate_effects <= 8
