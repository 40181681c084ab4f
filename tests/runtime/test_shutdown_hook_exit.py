"""A shutdown hook that raises what is not an ``Exception`` (``sys.exit()``,
``KeyboardInterrupt``, a ``BaseException`` of its own): the worker still closes what it owns
and reads as stopped, then the exception goes on. Before, it left ``stop()`` half done: the
worker never read as stopped, so ``wait_stopped()`` waited for ever, and so did ``oncely run``
after SIGTERM.

The in-process test runs its own event loop, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

import oncely

ROOT = Path(__file__).resolve().parents[2]

Run = Callable[[Coroutine[Any, Any, None]], None]
LOOPS: dict[str, Run] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


class _Broke(BaseException):
    """Not an ``Exception``: a hook's ``except Exception`` lets it through."""


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("raises", [SystemExit(4), KeyboardInterrupt(), _Broke()], ids=repr)
def test_a_hook_raising_a_base_exception_still_stops_the_worker(
    unique: str, loop: str, raises: BaseException
) -> None:
    app = oncely.App()
    ran: list[str] = []

    @app.handler("t")
    async def handle(_: dict[str, int]) -> None:
        pass

    @app.on_shutdown
    async def undo_first_startup() -> None:  # registered first, so it would run last
        ran.append("last")

    @app.on_shutdown
    async def broken() -> None:
        ran.append("broken")
        raise raises

    async def main() -> None:
        worker = oncely.Worker(app, broker=f"memory://{unique}")
        await worker.start()
        with pytest.raises(type(raises)) as raised:
            await worker.stop()
        assert raised.value is raises
        await asyncio.wait_for(worker.wait_stopped(), 5)  # before: for ever
        assert worker.state == "stopped"
        assert not worker._owned  # the broker it opened is closed
        await worker.stop()  # stopped: a no-op, not another run of the hooks

    LOOPS[loop](main())
    assert ran == ["broken"]  # the hooks after the one that raised are skipped


APP = """
import os
import sys

import oncely

app = oncely.App("hook-exit")


@app.handler("jobs")
async def job(_: dict[str, int]) -> None:
    pass


@app.on_startup
async def up() -> None:
    open(os.environ["HOOK_STARTED"], "w").close()


class Broke(BaseException):
    pass


@app.on_shutdown
async def down() -> None:
    if os.environ["HOOK_RAISES"] == "exit":
        sys.exit(4)
    raise Broke("the hook broke")
"""


@pytest.mark.parametrize(("raises", "exit_code"), [("exit", 4), ("broke", 1)])
def test_oncely_run_stops_cleanly_and_exits_after_sigterm_when_a_hook_raises(
    tmp_path: Path, raises: str, exit_code: int
) -> None:
    """Before: with ``sys.exit(4)`` the process exited 4 at once from the hook, the worker's
    broker left open and "worker stopped" never logged; with any other ``BaseException`` it
    never exited at all."""
    (tmp_path / "hookapp.py").write_text(APP)
    started = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env["HOOK_STARTED"] = str(started)
    env["HOOK_RAISES"] = raises
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    log = tmp_path / "worker.log"
    url = f"sqlite:///{tmp_path / 'q.db'}"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oncely", "run", "hookapp:app", "--broker", url],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)  # before: it never exited
    finally:
        proc.kill()
        proc.wait()
    out = log.read_text()
    assert code == exit_code, out
    assert "shutdown hook" in out and ("raised SystemExit" in out or "raised Broke" in out), out
    assert "worker stopped" in out, out
