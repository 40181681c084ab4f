"""The runtime on a real Kafka: the same handler code as on the other brokers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

import oncely
from examples import orders
from oncely.brokers.base import DeadLetterAdmin
from tests._wait import eventually
from tests.brokers.kafka_support import BOOTSTRAP, kafka_url

pytestmark = [pytest.mark.kafka, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    return subprocess.run(
        [sys.executable, "-m", "oncely", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_retries_dead_letters_dedupe_and_the_dlq_cli_on_kafka(unique: str) -> None:
    app = oncely.App()
    runs: Counter[str] = Counter()

    @app.handler(
        unique,
        idempotent=True,
        key="payload:id",
        retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01),
    )
    async def handle(p: dict[str, Any], ctx: oncely.Context) -> None:
        runs[p["id"]] += 1
        if p["id"] == "flaky" and ctx.attempt < 2:
            raise ConnectionError("downstream hiccup")
        if p["id"] == "doomed":
            raise ValueError("never works")

    url = kafka_url()
    async with oncely.Worker(app, broker=url, store=f"memory://{unique}") as worker:
        for pid in ("a", "a", "flaky", "doomed"):
            await app.publish(unique, {"id": pid})
        await app.publish(unique, b"\xff not json")
        await eventually(
            lambda: (
                worker.stats.processed + worker.stats.duplicates == 3
                and worker.stats.dead_lettered == 2
            ),
            60,
        )
        assert isinstance(worker.broker, DeadLetterAdmin)
        letters = await worker.broker.dead_letters(unique)
    assert runs == {"a": 1, "flaky": 2, "doomed": 3}
    reasons = sorted(letter.reason for letter in letters)
    assert reasons[0] == "ValueError: never works (gave up after 3 attempts)"
    assert reasons[1].startswith("undecodable payload")
    doomed = next(x for x in letters if x.reason.startswith("ValueError"))
    # Where the last attempt was read from: its retry topic (0.01 s rounds up to 1 s).
    assert doomed.headers["oncely-original-topic"] == f"{unique}.retry.1s"
    assert int(doomed.headers["oncely-original-offset"]) >= 0
    assert doomed.attempt == 3

    listed = cli("dlq", "list", unique, "--broker", url)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(x["reason"] for x in lines) == reasons
    replayed = cli("dlq", "replay", unique, "--id", doomed.id, "--broker", url)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 1 message(s) to {unique!r}" in replayed.stdout
    after = cli("dlq", "list", unique, "--broker", url)
    assert [json.loads(line)["reason"] for line in after.stdout.splitlines()] == [reasons[1]]
    again = cli("dlq", "replay", unique, "--id", doomed.id, "--broker", url)
    assert "replayed 0 message(s)" in again.stdout, "a replayed letter is not replayed twice"


async def _start_group_at_end(group: str, topic: str) -> None:
    """A long-lived server keeps earlier runs' ``orders``: start this group after them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        if tps:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            await consumer.commit(dict(ends.items()))
    finally:
        await consumer.stop()


async def test_orders_module_runs_unchanged_on_kafka(unique: str) -> None:
    group = f"g-{unique}"
    await _start_group_at_end(group, "orders")
    orders.placed.clear()
    settings = oncely.load_settings(
        environ={"ONCELY_BROKER": kafka_url(group), "ONCELY_STORE": "memory://"}
    )
    only = ["examples.orders.place_order"]
    async with oncely.Worker(orders.app, settings=settings, handlers=only) as w:
        for _ in range(2):
            await orders.app.publish("orders", orders.Order(id="x", sku="s", qty=1))
        await eventually(lambda: w.stats.processed + w.stats.duplicates == 2, 60)
    assert orders.placed == {"x": 1}
