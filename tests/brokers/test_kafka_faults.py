"""Kafka under membership changes and a broker restart: nothing lost, duplicates counted.

The restart test runs its own Kafka (other ports, a data directory of its own) from the jars
``scripts/services.sh`` resolved; the shared server is never restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.brokers.kafka import KafkaBroker
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url
from tests.brokers.test_kafka import read_log, spawn_worker

pytestmark = [pytest.mark.kafka, pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("ONCELY_TEST_SERVICES_DIR", "/var/lib/oncely"))
KAFKA_LIB = Path(os.environ.get("ONCELY_TEST_KAFKA_LIB", str(STATE_DIR / "kafka" / "lib")))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_members_join_and_leave_mid_stream_without_loss(
    unique: str, tmp_path: Path, report: Any
) -> None:
    n = 8000
    group = f"g-{unique}"
    url = kafka_url(group, partitions=4, session_timeout_ms=6000)
    log = tmp_path / "handled.log"
    async with KafkaBroker.from_url(url) as broker:
        await broker.ensure_topics([unique])
        for start in range(0, n, 2000):
            await asyncio.gather(*(
                broker.publish(unique, b"x", message_id=f"m{i}", headers={"oncely-key": f"k{i}"})
                for i in range(start, start + 2000)
            ))  # fmt: skip
    env = {"KAFKA_APP_TOPIC": unique, "KAFKA_APP_LOG": str(log), "KAFKA_APP_SLEEP": "0.02"}
    procs = [spawn_worker(url, "record", env) for _ in range(2)]
    try:
        await eventually(lambda: len(read_log(log)) >= n // 5, 120)
        third = spawn_worker(url, "record", env)
        procs.append(third)
        await eventually(lambda: _handled_by(log, third.pid) >= 200, 120)
        third.send_signal(signal.SIGTERM)  # leaves the group: another rebalance
        assert third.wait(timeout=60) == 0
        await eventually(lambda: len({line.split()[0] for line in read_log(log)}) == n, 180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    ids = Counter(line.split()[0] for line in read_log(log))
    by_pid = Counter(line.split()[1] for line in read_log(log))
    duplicates = sum(ids.values()) - len(ids)
    report(
        f"kafka rebalance: {n} messages, 2 workers + 1 joining and leaving: 0 lost, "
        f"{duplicates} handled twice; per worker {sorted(by_pid.values())}"
    )
    assert set(ids) == {f"m{i}" for i in range(n)}
    assert len(by_pid) == 3


def _handled_by(log: Path, pid: int) -> int:
    return sum(1 for line in read_log(log) if line.split()[1] == str(pid))


class PrivateKafka:
    """A throwaway single-node Kafka on its own ports and data directory."""

    def __init__(self, data: Path, port: int, controller_port: int) -> None:
        self.data, self.port, self.controller_port = data, port, controller_port
        self.config = data / "server.properties"
        self.log = data / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, *args: str) -> subprocess.Popen[bytes]:
        cmd = ["java", "-Xmx384m", "-cp", f"{KAFKA_LIB}/*", *args]
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> None:
        if not self.config.exists():
            template = (ROOT / "scripts" / "kafka" / "server.properties.in").read_text()
            self.config.write_text(
                template.replace("@DATA@", str(self.data / "logs"))
                .replace("@CONTROLLER_PORT@", str(self.controller_port))
                .replace("@PORT@", str(self.port))
            )
            fmt = self._java(
                "kafka.tools.StorageTool", "format", "--config", str(self.config),
                "--cluster-id", "b25jZWx5LXByaXZhdGUtMDAx", "--ignore-formatted",
            )  # fmt: skip
            assert fmt.wait(timeout=120) == 0, self.log.read_text()[-2000:]
        self.proc = self._java("kafka.Kafka", str(self.config))
        deadline = time.monotonic() + 90
        probe = [sys.executable, str(ROOT / "scripts" / "kafka" / "probe.py"), "127.0.0.1"]
        while subprocess.run([*probe, str(self.port)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"private kafka did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateKafka]:
    port = 19092 + (os.getpid() % 200) * 2
    kafka = PrivateKafka(tmp_path, port, port + 1)
    kafka.start()
    try:
        yield kafka
    finally:
        if kafka.proc is not None and kafka.proc.poll() is None:
            kafka.proc.terminate()
            try:
                kafka.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kafka.proc.kill()
                kafka.proc.wait(timeout=60)


async def test_broker_restart_mid_stream_loses_nothing(
    private_kafka: PrivateKafka, report: Any
) -> None:
    n = 3000
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    # Large records: one fetch (1 MiB per partition) holds a few hundred, so most must be
    # fetched after the restart, not before the kill.
    body = b"x" * 4000
    url = f"kafka://{private_kafka.bootstrap}/?group=g-{topic}&partitions=2&request_timeout=10s"
    app = oncely.App()
    handled: Counter[str] = Counter()

    @app.handler(topic, concurrency=16)
    async def handle(body: bytes, ctx: oncely.Context) -> None:
        await asyncio.sleep(0.002)
        handled[ctx.delivery.id] += 1

    async with KafkaBroker.from_url(url) as publisher:
        for start in range(0, n, 500):
            await asyncio.gather(*(
                publisher.publish(topic, body, message_id=f"r{i}")
                for i in range(start, start + 500)
            ))  # fmt: skip
    async with oncely.Worker(app, broker=url) as worker:
        await eventually(lambda: len(handled) >= n // 3, 60)
        await asyncio.to_thread(private_kafka.kill)
        at_kill = len(handled)
        await asyncio.sleep(2.0)  # the worker meets a dead broker
        during = len(handled)
        await asyncio.to_thread(private_kafka.start)
        await eventually(lambda: len(handled) == n, 120)
        await asyncio.sleep(1.0)  # let a late redelivery show up in the count
        stats = worker.stats.as_dict()
    duplicates = sum(handled.values()) - len(handled)
    report(
        f"kafka broker restart (SIGKILL) after {at_kill}/{n} handled ({during} while it was "
        f"down): 0 lost, "
        f"{duplicates} handled twice; worker stats {stats}"
    )
    assert set(handled) == {f"r{i}" for i in range(n)}
    assert during < n, "the kill must leave work for after the restart"
