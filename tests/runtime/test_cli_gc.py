"""``oncely run`` freezes what the started worker holds out of the garbage collector's way
(``gc.freeze``), and the library never does (it must not change process-wide state)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import oncely

ROOT = Path(__file__).resolve().parents[2]

APP = """
import gc, json, os, signal
import oncely

app = oncely.App("gcapp")


@app.handler("jobs")
async def job(_: dict[str, int]) -> None:
    with open(os.environ["GC_REPORT"], "w") as out:
        json.dump({"frozen": gc.get_freeze_count()}, out)
    os.kill(os.getpid(), signal.SIGTERM)
"""


def test_run_freezes_the_started_workers_heap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"

    async def publish() -> None:
        async with oncely.Publisher(url) as pub:
            await pub.publish("jobs", {"n": 1})

    asyncio.run(publish())
    (tmp_path / "gcapp.py").write_text(APP)
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env["GC_REPORT"] = str(report)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    out = subprocess.run(
        [sys.executable, "-m", "oncely", "run", "gcapp:app", "--broker", url],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # Everything loaded and started is frozen: far more than the handful of objects a
    # handler's own call allocates.
    assert json.loads(report.read_text())["frozen"] > 10_000


@pytest.mark.anyio
async def test_an_embedded_worker_leaves_the_collector_alone() -> None:
    app = oncely.App("embedded")
    ran = asyncio.Event()

    @app.handler("jobs")
    async def job(_: dict[str, int]) -> None:
        ran.set()

    before = gc.get_freeze_count()
    async with oncely.Worker(app, broker="memory://"):
        await app.publish("jobs", {"n": 1})
        await asyncio.wait_for(ran.wait(), 10)
        assert gc.get_freeze_count() == before
