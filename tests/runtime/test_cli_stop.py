"""``oncely run`` as a process: a second signal stops at once, and a consume loop that cannot
work makes the process exit non-zero with the traceback logged."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import oncely
from oncely.brokers.sqlite import SqliteBroker
from oncely.runtime.codec import fingerprint
from oncely.stores.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]


def start(args: list[str], log: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env.update(extra_env)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "oncely", "run", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for(cond: object, within: float, what: str) -> None:
    assert callable(cond)
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.05)


def test_consume_error_that_no_retry_fixes_exits_non_zero(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    proc = start(
        ["tests.runtime.cli_apps:app", "--broker", "badconsume://x", "--store", "memory://"],
        log,
        {"CLI_APPS_STARTED": str(tmp_path / "started")},
    )
    try:
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    out = log.read_text()
    assert code == 1, out
    assert "Traceback" in out and "ValueError: visibility must be > 0, got -1" in out
    assert "WorkerFailed" in out


def test_second_signal_cuts_the_drain_short_and_gives_the_message_back(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    url = f"sqlite:///{db}"
    started = tmp_path / "started"

    async def publish() -> None:
        async with oncely.Publisher(url) as pub:
            await pub.publish("slow", {"id": "job-1"})

    asyncio.run(publish())
    log = tmp_path / "worker.log"
    proc = start(
        ["tests.runtime.cli_apps:app", "--broker", url, "--grace", "20", "--loop", "asyncio"],
        log,
        {"CLI_APPS_STARTED": str(started)},
    )
    try:
        wait_for(started.exists, 30, "the handler to start")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining 1 in-flight" in log.read_text(), 10, "the drain to begin")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    out = log.read_text()
    assert code == 0, out
    assert elapsed < 10, out  # a bound, not a benchmark: without the fix it waits out 20 s
    assert started.read_text() == "job-1"  # never finished

    async def take_over() -> tuple[int, oncely.Outcome]:
        # A second worker takes the message at once: it was nacked with no delay, as a
        # deferral (the attempt is unchanged), and its lease was released.
        broker = SqliteBroker.from_url(url)
        store = SqliteStore(db)
        async with broker, store, broker.consume("slow", prefetch=1, visibility=30) as sub:
            # At once; without the nack it would wait out the 30 s visibility.
            delivery = await asyncio.wait_for(sub.__anext__(), 15)
            begun = await store.begin(
                "tests.runtime.cli_apps.slow:job-1", fingerprint(delivery.body), 30
            )
            await delivery.ack()
            return delivery.attempt, begun.outcome

    attempt, outcome = asyncio.run(take_over())
    assert attempt == 1
    assert outcome is oncely.Outcome.NEW, "the lease was not released"
    assert "cancelled" in out or "'cancelled': 1" in out


def test_a_second_signal_exits_past_a_handler_that_swallows_its_cancel(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    url = f"sqlite:///{db}"
    started = tmp_path / "started"

    async def publish() -> None:
        async with oncely.Publisher(url) as pub:
            await pub.publish("stubborn", {"id": "job-1"})

    asyncio.run(publish())
    log = tmp_path / "worker.log"
    proc = start(
        ["tests.runtime.cli_apps:stubborn_app", "--broker", url, "--grace", "0.2"],
        log,
        {"CLI_APPS_STARTED": str(started)},
    )
    try:
        wait_for(started.exists, 30, "the handler to start")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: started.read_text() == "swallowed", 30, "the cancel to be swallowed")
        # Before, the second signal changed nothing: the process waited for the handler for
        # ever (and asyncio.run's own clean-up would have too).
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    out = log.read_text()
    assert code == 1, out
    assert "1 handler(s) ignored their cancel" in out and "stubborn" in out, out

    async def take_over() -> int:
        # Never acked nor given back: it comes back once its visibility (1 s) runs out.
        broker = SqliteBroker.from_url(url)
        async with broker, broker.consume("stubborn", prefetch=1, visibility=30) as sub:
            delivery = await asyncio.wait_for(sub.__anext__(), 30)
            await delivery.ack()
            return delivery.attempt

    assert asyncio.run(take_over()) == 2
