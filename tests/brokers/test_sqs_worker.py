"""The runtime on SQS (ElasticMQ): retries, dead letters, dedupe, FIFO order, a SIGKILLed
worker process, and a server restart."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import oncely
from examples import orders
from oncely.brokers.sqs import SqsBroker
from tests._wait import eventually
from tests.brokers.test_sqs import SQS_URL, delete_queues, plain_client
from tests.conftest import one_loop

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = [pytest.mark.sqs, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
ELASTICMQ_LIB = os.environ.get("ONCELY_TEST_ELASTICMQ_LIB", "/var/lib/oncely/elasticmq/lib")


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_queues([unique, unique + ".fifo"])


async def test_orders_module_runs_unchanged_on_sqs(unique: str) -> None:
    # A queue prefix keeps this run's "orders" queue apart from any other.
    url = SQS_URL.replace("sqs://", f"sqs://{unique}-", 1)
    orders.placed.clear()
    settings = oncely.load_settings(environ={"ONCELY_BROKER": url, "ONCELY_STORE": "memory://"})
    only = ["examples.orders.place_order"]
    try:
        async with oncely.Worker(orders.app, settings=settings, handlers=only) as w:
            for _ in range(2):
                await orders.app.publish("orders", orders.Order(id="x", sku="s", qty=1))
            await eventually(lambda: w.stats.processed + w.stats.duplicates == 2, within=30)
    finally:
        await delete_queues(["orders"], url)
    assert orders.placed == {"x": 1}


async def test_fifo_groups_run_in_order_and_in_parallel(topic: str) -> None:
    fifo = topic + ".fifo"
    app = oncely.App()
    order: dict[str, list[int]] = collections.defaultdict(list)
    running: set[str] = set()
    overlap = 0
    rng = random.Random(7)

    @app.handler(fifo, concurrency=32, visibility=30)
    async def handle(p: dict[str, Any]) -> None:
        nonlocal overlap
        group = p["g"]
        assert group not in running, f"two messages of group {group} ran at once"
        running.add(group)
        overlap = max(overlap, len(running))
        await asyncio.sleep(rng.random() * 0.03)
        order[group].append(p["n"])
        running.discard(group)

    groups, per_group = 20, 15
    async with oncely.Worker(app, broker=SQS_URL) as worker:
        # Interleaved publishes, so one receive often brings several messages of one group.
        await asyncio.gather(
            *(_publish_group(app, fifo, f"g{g}", per_group) for g in range(groups))
        )
        await eventually(lambda: worker.stats.processed == groups * per_group, within=60)
    assert {g: ns for g, ns in order.items()} == {
        f"g{g}": list(range(per_group)) for g in range(groups)
    }
    assert overlap > 1, "different groups must run in parallel"


async def _publish_group(app: oncely.App, topic: str, group: str, n: int) -> None:
    for i in range(n):
        await app.publish(topic, {"g": group, "n": i}, key=group)


# ------------------------------------------------------------------ a worker process killed

_KILL_APP = """
import os, pathlib, oncely

app = oncely.App("killed")
MARK = pathlib.Path(os.environ["KILL_MARK"])

@app.handler(os.environ["KILL_TOPIC"], concurrency=1, visibility=2.0, timeout=600)
async def slow(p: dict, ctx: oncely.Context) -> None:
    import asyncio
    MARK.write_text(f"started {ctx.attempt}")
    await asyncio.sleep(600)
"""


def test_sigkilled_worker_message_comes_back_with_attempt_2(unique: str, tmp_path: Path) -> None:
    try:
        _kill_midway(unique, tmp_path)
    finally:
        asyncio.run(delete_queues([unique]))


def _kill_midway(topic: str, tmp_path: Path) -> None:
    (tmp_path / "kill_app.py").write_text(textwrap.dedent(_KILL_APP))
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "KILL_MARK": str(mark),
        "KILL_TOPIC": topic,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
    }
    mid = asyncio.run(_publish(topic))
    cmd = [sys.executable, "-m", "oncely", "run", "kill_app:app", "--broker", SQS_URL]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never started the handler"
            time.sleep(0.05)
        # Past the 2 s visibility: the heartbeat has extended it at least twice by now.
        time.sleep(3)
        assert mark.read_text() == "started 1"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    got = asyncio.run(_receive_one(topic))
    assert got == (mid, 2)


async def _publish(topic: str) -> str:
    async with SqsBroker.from_url(SQS_URL) as broker:
        return await broker.publish(topic, b'{"job": "long"}')


async def _receive_one(topic: str) -> tuple[str, int]:
    async with SqsBroker.from_url(SQS_URL) as broker:
        async with broker.consume(topic, prefetch=1, visibility=30) as sub:
            d = await asyncio.wait_for(anext(sub), 30)
            await d.ack()
            return d.id, d.attempt


# ------------------------------------------------------------------- a server restart

_CONF = """
include classpath("application.conf")
node-address {{ protocol = http, host = "127.0.0.1", port = {port}, context-path = "" }}
generate-node-address = false
rest-sqs {{ enabled = true, bind-hostname = "127.0.0.1", bind-port = {port} }}
rest-stats {{ enabled = false }}
aws {{ region = "us-east-1", accountId = "000000000000" }}
pekko.loglevel = "INFO"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateElasticMQ:
    """An ElasticMQ of this test's own, on its own port (the shared one is never touched)."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.conf = tmp / "elasticmq.conf"
        self.conf.write_text(_CONF.format(port=self.port))
        self.log = tmp / "elasticmq.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                "java", "-Xmx256m", f"-Dconfig.file={self.conf}", "-cp", f"{ELASTICMQ_LIB}/*",
                "org.elasticmq.server.Main", stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                async with plain_client(self.endpoint) as client:
                    await client.list_queues()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.returncode is not None:
                    raise AssertionError(self.log.read_text()[-2000:]) from None
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
async def private_server(tmp_path: Path) -> AsyncIterator[PrivateElasticMQ]:
    server = PrivateElasticMQ(tmp_path)
    yield server
    await server.stop()


async def test_worker_carries_on_after_a_server_restart(
    private_server: PrivateElasticMQ, unique: str
) -> None:
    """What this checks: a worker consuming from a server that restarts (ElasticMQ is in
    memory, so its queues and the messages in them are gone) keeps running, recreates its
    queues, and handles every message published after the restart exactly once. Messages
    handled before the restart stay handled once; none published before it are expected after.
    """
    await private_server.start()
    url = f"sqs://?region=us-east-1&endpoint={private_server.endpoint}&wait=1"
    app = oncely.App()
    seen: collections.Counter[str] = collections.Counter()

    @app.handler(unique, concurrency=8, visibility=10)
    async def handle(p: dict[str, Any]) -> None:
        seen[p["id"]] += 1

    async with oncely.Worker(app, broker=url) as worker:
        for i in range(20):
            await app.publish(unique, {"id": f"before-{i}"})
        await eventually(lambda: worker.stats.processed == 20, within=30)
        await private_server.stop()
        await private_server.start()
        after = [f"after-{i}" for i in range(20)]
        for pid in after:
            await app.publish(unique, {"id": pid})
        await eventually(lambda: all(seen[pid] for pid in after), within=60)
    assert seen == collections.Counter(
        {f"before-{i}": 1 for i in range(20)} | dict.fromkeys(after, 1)
    )


@one_loop  # the commands run in a subprocess
async def test_dlq_list_and_replay_through_the_cli(topic: str) -> None:
    async with SqsBroker.from_url(SQS_URL) as broker:
        mid = await broker.publish(topic, b'{"bad": true}')
        async with broker.consume(topic, prefetch=1, visibility=30) as sub:
            d = await anext(sub)
            await d.reject("bad input")
    listed = await _cli("dlq", "list", topic)
    assert mid in listed and "bad input" in listed
    await _cli("dlq", "replay", topic, "--all")
    async with SqsBroker.from_url(SQS_URL) as broker:
        assert await broker.dead_letters(topic) == []
        async with broker.consume(topic, prefetch=1, visibility=30) as sub:
            d = await asyncio.wait_for(anext(sub), 10)
            assert (d.id, d.attempt, d.body) == (mid, 1, b'{"bad": true}')
            await d.ack()


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oncely", *args,
        env={**os.environ, "ONCELY_BROKER": SQS_URL}, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()
