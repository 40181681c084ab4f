"""A handler (or ``on_duplicate`` hook) that raises a ``BaseException`` that is not an
``Exception`` (a library's own, say) fails that message like any error: retried, then
dead-lettered. Before, it went past every ``except Exception`` and killed the pool's task,
leaving the delivery unsettled and its key leased: the message came back after its
visibility to do the same again, for ever, never dead-lettered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from oncely.stores.memory import MemoryStore
from tests._wait import eventually

pytestmark = pytest.mark.anyio


class Abort(BaseException):
    """What some libraries raise to unwind past ``except Exception``."""


@pytest.mark.parametrize("guarantee", ["effectively_once", "at_least_once"])
async def test_a_handler_raising_a_base_exception_fails_its_message(
    unique: str, guarantee: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = oncely.App()
    runs: list[int] = []

    @app.handler(
        "t",
        guarantee=guarantee,  # type: ignore[arg-type]
        visibility=1,
        retry=oncely.RetryPolicy(max_attempts=2, base=0.01, jitter=False),
    )
    async def handle(_: Any, ctx: oncely.Context) -> None:
        runs.append(ctx.attempt)
        raise Abort("unwinding")

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("t")
    assert runs == [1, 2]
    assert letter.reason.startswith("Abort: unwinding"), letter.reason
    assert worker.stats.retried == 1 and worker.stats.internal_errors == 0
    assert not [r for r in caplog.records if "task died" in r.getMessage()]


async def test_at_most_once_a_base_exception_is_a_failure(unique: str) -> None:
    app = oncely.App()
    runs: list[int] = []

    @app.handler("t", guarantee="at_most_once", concurrency=1)
    async def handle(payload: dict[str, int]) -> None:
        runs.append(payload["n"])
        if payload["n"] == 1:
            raise Abort("unwinding")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("t", {"n": 1})
        await app.publish("t", {"n": 2})
        await eventually(lambda: worker.stats.processed == 1 and worker.stats.failed == 1)
    assert runs == [1, 2]


async def test_an_on_duplicate_hook_raising_a_base_exception_fails_the_duplicate(
    unique: str,
) -> None:
    app = oncely.App()

    async def again(result: None, ctx: oncely.Context) -> None:
        raise Abort("hook unwinding")

    @app.handler(
        "t",
        idempotent=True,
        visibility=1,
        on_duplicate=again,
        retry=oncely.RetryPolicy(max_attempts=1),
    )
    async def handle(_: Any) -> None: ...

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.processed == 1)
        await app.publish("t", {}, key="k")
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("t")
    assert letter.reason.startswith("on_duplicate: Abort: hook unwinding"), letter.reason


EXITING = """
import asyncio, sys
import oncely

app = oncely.App()


@app.handler("t", retry=oncely.RetryPolicy(max_attempts=1))
async def handle(_: dict[str, int]) -> None:
    sys.exit(3)


async def main() -> None:
    async with oncely.Worker(app, broker=sys.argv[1]):
        await app.publish("t", {})
        await asyncio.Event().wait()  # the handler's exit ends this process


asyncio.run(main())
"""


def test_a_handler_calling_sys_exit_settles_its_message_then_stops(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    done = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    # Before, the exit left the message claimed and unsettled: every worker that took it
    # again would exit too, for ever. Now it was a failure, its one attempt spent.
    letters = asyncio.run(_dead_letters(url))
    assert [letter.reason for letter in letters] == ["SystemExit: 3 (gave up after 1 attempts)"]


async def _dead_letters(url: str) -> list[Any]:
    broker = oncely.broker_from_url(url)
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        return await broker.dead_letters("t")
