"""A handler that raises ``SystemExit`` (``sys.exit(n)``) or ``KeyboardInterrupt`` stops the
worker as SIGTERM does: no message starts after it, the others in flight finish and are acked,
and then the exception goes on, out of ``asyncio.run()`` (or ``oncely run``, with its code).

Before, it went on at once from the pool's task: the event loop's run ended with the other
handlers mid-flight, cancelled by ``asyncio.run()``'s clean-up and given back, not finished.

The in-process tests run their own event loop (the exception ends it), on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.brokers.memory import MemoryBroker
from tests._wait import eventually

ROOT = Path(__file__).resolve().parents[2]

Run = Callable[[Coroutine[Any, Any, None]], None]
LOOPS: dict[str, Run] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("exit_with", [SystemExit(3), KeyboardInterrupt()], ids=repr)
def test_a_handler_exiting_drains_the_others_then_raises_on(
    unique: str, loop: str, exit_with: BaseException
) -> None:
    app = oncely.App()
    started: list[int] = []
    finished: list[int] = []
    go = asyncio.Event()
    seen: dict[str, Any] = {}

    @app.handler(
        "t", guarantee="at_least_once", concurrency=3, retry=oncely.RetryPolicy(max_attempts=1)
    )
    async def handle(job: dict[str, int]) -> None:
        started.append(job["n"])
        if job["n"] == 3:
            raise exit_with
        await go.wait()
        finished.append(job["n"])

    async def main() -> None:
        worker = oncely.Worker(app, broker=f"memory://{unique}")
        seen["worker"] = worker
        async with worker:
            for n in (1, 2):
                await app.publish("t", {"n": n})
            await eventually(lambda: started == [1, 2])  # both mid-flight, on the event
            for n in (3, 4):  # 4 waits for room: the pool holds 3
                await app.publish("t", {"n": n})
            await eventually(lambda: worker.state == "draining")
            go.set()
            await asyncio.Event().wait()  # the handler's exit ends this run

    with pytest.raises(type(exit_with)) as raised:
        LOOPS[loop](main())
    assert raised.value is exit_with
    assert started == [1, 2, 3] and sorted(finished) == [1, 2]  # nothing started after 3
    worker = seen["worker"]
    assert worker.state == "stopped"
    assert worker.stats.processed == 2 and worker.stats.acked == 2, worker.stats
    assert worker.stats.dead_lettered == 1 and worker.stats.cancelled == 0, worker.stats
    left, letters = asyncio.run(_left(unique))
    assert left == 1  # message 4, never taken
    assert [letter.reason for letter in letters] == [
        f"{type(exit_with).__name__}: {exit_with} (gave up after 1 attempts)"
    ]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handler_exiting_during_a_stop_is_raised_once_the_stop_ends(
    unique: str, loop: str
) -> None:
    app = oncely.App()
    started: list[int] = []
    go = asyncio.Event()
    seen: dict[str, Any] = {}

    @app.handler("t", guarantee="at_least_once", concurrency=2)
    async def handle(job: dict[str, int]) -> None:
        started.append(job["n"])
        await go.wait()
        if job["n"] == 1:
            sys.exit(4)

    async def main() -> None:
        worker = oncely.Worker(app, broker=f"memory://{unique}")
        seen["worker"] = worker
        await worker.start()
        for n in (1, 2):
            await app.publish("t", {"n": n})
        await eventually(lambda: sorted(started) == [1, 2])
        stopping = asyncio.create_task(worker.stop())  # as SIGTERM does
        await eventually(lambda: worker.state == "draining")
        go.set()
        await stopping  # the stop drains both, then the exit goes on
        await asyncio.Event().wait()

    with pytest.raises(SystemExit) as raised:
        LOOPS[loop](main())
    assert raised.value.code == 4
    worker = seen["worker"]
    assert worker.state == "stopped"
    assert worker.stats.processed == 1 and worker.stats.retried == 1, worker.stats


class _HookBroke(BaseException):
    """Not an ``Exception``: the shutdown hooks' ``except Exception`` lets it through."""


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handler_exit_goes_on_even_if_the_stop_it_asked_for_fails(unique: str, loop: str) -> None:
    """A stop that raises (here a shutdown hook's ``BaseException``) must not swallow the
    handler's exit: before, the exit's task kept the failure to itself and never raised, so
    the run (and ``oncely run``) waited for ever on a worker that would never stop."""
    app = oncely.App()

    @app.handler("t", guarantee="at_least_once", retry=oncely.RetryPolicy(max_attempts=1))
    async def handle(_: dict[str, int]) -> None:
        sys.exit(5)

    @app.on_shutdown
    async def broken() -> None:
        raise _HookBroke("the hook broke")

    async def main() -> None:
        # Not ``async with``: its stop() would wait for ever on the stop that failed.
        await oncely.Worker(app, broker=f"memory://{unique}").start()
        await app.publish("t", {"n": 1})
        # Bounded: the exit ends this run long before; without it, this raises instead.
        await asyncio.wait_for(asyncio.Event().wait(), 10)

    with pytest.raises(SystemExit) as raised:
        LOOPS[loop](main())
    assert raised.value.code == 5


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("taker", ["new task", "idle task"])
def test_a_delivery_handed_over_in_the_pass_a_handler_exits_in_is_given_back(
    unique: str, loop: str, taker: str
) -> None:
    """The consume loop hands message 3 over (to a new task, or to an idle one) in the same
    pass of the event loop in which, after it, message 2's handler exits: 3's task has not
    started it yet. Before, it started it after the exit (spending an attempt: with one
    attempt, dead-lettered for an exit that was not its own)."""
    app = oncely.App()
    started: list[int] = []
    boom = asyncio.Event()
    seen: dict[str, Any] = {}

    @app.handler(
        "t", guarantee="at_least_once", concurrency=3, retry=oncely.RetryPolicy(max_attempts=1)
    )
    async def handle(job: dict[str, int]) -> None:
        started.append(job["n"])
        if job["n"] == 2:
            await boom.wait()
            sys.exit(5)

    async def main() -> None:
        worker = oncely.Worker(app, broker=f"memory://{unique}")
        seen["worker"] = worker
        async with worker:
            await app.publish("t", {"n": 2})
            await eventually(lambda: started == [2])
            if taker == "idle task":
                await app.publish("t", {"n": 1})
                await eventually(lambda: worker.stats.processed == 1)  # its task waits idle
            # In one step: the publish wakes the consume loop, then boom wakes 2's handler,
            # so on the next pass the loop hands 3 over just before 2 exits.
            await app.publish("t", {"n": 3})
            boom.set()
            await asyncio.Event().wait()  # the handler's exit ends this run

    with pytest.raises(SystemExit) as raised:
        LOOPS[loop](main())
    assert raised.value.code == 5
    assert 3 not in started, started
    worker = seen["worker"]
    assert worker.state == "stopped"
    left, letters = asyncio.run(_left(unique))
    assert left == 1  # message 3, given back
    assert [letter.reason for letter in letters] == ["SystemExit: 5 (gave up after 1 attempts)"]


async def _left(hub: str) -> tuple[int, list[Any]]:
    async with MemoryBroker(hub) as broker:
        backlog = await broker.backlog("t")
        assert backlog is not None and isinstance(broker, DeadLetterAdmin)
        return backlog[""], await broker.dead_letters("t")


@pytest.mark.parametrize("loop", LOOPS)
def test_oncely_run_exits_with_the_code_a_handler_exits_with(tmp_path: Path, loop: str) -> None:
    db = tmp_path / "q.db"
    url = f"sqlite:///{db}"
    started, go = tmp_path / "started", tmp_path / "go"

    async def publish() -> None:
        async with oncely.Publisher(url) as pub:
            await pub.publish("exiting", {"id": "slow"})
            await pub.publish("exiting", {"id": "exit"})

    asyncio.run(publish())
    log = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env.update(CLI_APPS_STARTED=str(started), CLI_APPS_GO=str(go))
    args = ["tests.runtime.cli_apps:exiting_app", "--broker", url, "--grace", "30"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oncely", "run", *args, "--loop", loop],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "draining 1 in-flight" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        go.touch()  # the slow handler, still in flight, may finish
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    out = log.read_text()
    assert code == 3, out
    assert "'processed': 1" in out, out  # the slow one finished and was acked
    letters = asyncio.run(_dead_letters(url))
    assert [letter.reason for letter in letters] == ["SystemExit: 3 (gave up after 1 attempts)"]


async def _dead_letters(url: str) -> list[Any]:
    broker = oncely.broker_from_url(url)
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        backlog = await broker.backlog("exiting")
        assert backlog == {"": 0}, backlog  # the slow one was acked
        return await broker.dead_letters("exiting")
