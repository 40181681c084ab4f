"""First and last error through retries (``nack(error=)``), on every broker, real servers.

A handler fails with error A on its first attempt and B on the next ones until its attempts
run out; ``oncely dlq list`` (through the CLI where a separate process can see the broker)
shows first=A and last=B wherever ``Capabilities.carries_errors`` holds, and on SQS, which
cannot change a message on nack, the last error only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.brokers.base import ALL, DeadLetter, DeadLetterAdmin, Headers, error_headers
from oncely.brokers.registry import broker_from_url
from oncely.runtime._cli_dlq import letter_json
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url
from tests.brokers.test_amqp import AMQP_URL, delete_topology
from tests.brokers.test_dlq_admin import dead_letter, on_a_tty
from tests.brokers.test_dlq_admin import oncely as oncely_cli
from tests.brokers.test_sqs import SQS_URL, delete_queues

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
BROKERS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("amqp", marks=pytest.mark.amqp),
    pytest.param("sqs", marks=pytest.mark.sqs),
    pytest.param("kafka", marks=pytest.mark.kafka),
    pytest.param("kafka-eos", marks=pytest.mark.kafka),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def dead_letters(admin: DeadLetterAdmin, topic: str) -> list[DeadLetter]:
    """The topic's dead letters once there is one (bounded)."""
    deadline = time.monotonic() + 60
    while not (letters := await admin.dead_letters(topic, limit=ALL)):
        assert time.monotonic() < deadline, "no dead letter listed within 60s"
        await asyncio.sleep(0.2)
    return letters


@pytest.fixture
async def target(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[tuple[str, str, str]]:
    """(kind, broker URL, topic); the topic's server-side queues are removed after."""
    kind: str = request.param
    url = {
        "memory": f"memory://{unique}",
        "sqlite": f"sqlite:///{tmp_path / 'q.db'}",
        "amqp": AMQP_URL,
        "sqs": SQS_URL,
        "kafka": kafka_url(group=unique),
        # Exactly-once topics build their retry record in the transaction (another path).
        "kafka-eos": kafka_url(group=unique, exactly_once=unique),
    }[kind]
    try:
        yield kind, url, unique
    finally:
        if kind == "amqp":
            await delete_topology(unique)
        elif kind == "sqs":
            await delete_queues([unique])


def dlq_list(topic: str, url: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    out = subprocess.run(
        [sys.executable, "-m", "oncely", "dlq", "list", topic, "--broker", url],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("target", BROKERS, indirect=True)
async def test_dlq_list_shows_first_and_last_error_through_retries(
    target: tuple[str, str, str],
) -> None:
    kind, url, topic = target
    app = oncely.App()
    seen: list[tuple[int, str | None, str | None]] = []

    @app.handler(topic, retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01))
    async def fail(payload: dict[str, Any], ctx: oncely.Context) -> None:
        headers = ctx.delivery.headers
        seen.append(
            (ctx.attempt, headers.get(Headers.FIRST_ERROR), headers.get(Headers.LAST_ERROR))
        )
        raise ValueError("A" if ctx.attempt == 1 else f"B{ctx.attempt}")

    async with oncely.Worker(app, broker=url) as worker:
        admin = worker.broker
        assert isinstance(admin, DeadLetterAdmin) and admin is not None
        carries = admin.capabilities.carries_errors
        await app.publish(topic, {"n": 1})
        await eventually(lambda: worker.stats.dead_lettered == 1, within=60)
        # Counted when the reject returned; on Kafka exactly-once the dead letter commits
        # with the partition's next transaction, and read_committed shows it only then.
        letters = await dead_letters(admin, topic)

    assert carries is (kind != "sqs")
    assert [attempt for attempt, *_ in seen] == [1, 2, 3]
    last = "ValueError: B3 (gave up after 3 attempts)"
    if carries:
        # Each redelivery carries the first error and the one just before it.
        assert seen == [
            (1, None, None),
            (2, "ValueError: A", "ValueError: A"),
            (3, "ValueError: A", "ValueError: B2"),
        ]
        expected = ("ValueError: A", last)
    else:
        assert all(first is None and latest is None for _, first, latest in seen)
        expected = (None, last)  # failed after its first attempt: the first error is unknown

    if kind == "memory":
        # A memory:// hub lives in this process; the CLI's JSON comes from letter_json.
        [letter] = letters
        row = letter_json(letter, letter.failed_at)
    else:
        [row] = dlq_list(topic, url)
    assert (row["first_error"], row["last_error"]) == expected
    assert row["reason"] == last and row["attempt"] == 3


@pytest.mark.parametrize("target", [pytest.param("sqlite"), pytest.param("memory")], indirect=True)
async def test_a_replayed_letter_starts_its_error_history_again(
    target: tuple[str, str, str],
) -> None:
    _, url, topic = target
    async with broker_from_url(url) as broker:
        assert isinstance(broker, DeadLetterAdmin)
        await broker.publish(topic, b"{}", message_id="m")
        async with broker.consume(topic, prefetch=1, visibility=60) as sub:
            delivery = await anext(sub)
            await delivery.nack(0, error="E1")
            delivery = await anext(sub)
            assert delivery.headers[Headers.FIRST_ERROR] == "E1"
            await delivery.reject("E2")
        [letter] = await broker.dead_letters(topic)
        assert (letter.first_error, letter.last_error) == ("E1", "E2")
        assert await broker.replay(topic, ids=["m"]) == 1
        async with broker.consume(topic, prefetch=1, visibility=60) as sub:
            delivery = await anext(sub)
            assert Headers.FIRST_ERROR not in delivery.headers
            assert Headers.LAST_ERROR not in delivery.headers
            # A deferral with an error still records it; the attempt is kept.
            await delivery.nack(0, defer=True, error="E3")
            again = await anext(sub)
            assert again.attempt == delivery.attempt
            assert again.headers[Headers.FIRST_ERROR] == "E3"
            await again.ack()


def test_error_headers_keep_the_first_and_clip() -> None:
    first = error_headers({"x": "1"}, "E1")
    assert first == {"x": "1", Headers.FIRST_ERROR: "E1", Headers.LAST_ERROR: "E1"}
    second = error_headers(first, "E2" * 1000)
    assert second[Headers.FIRST_ERROR] == "E1"
    assert len(second[Headers.LAST_ERROR]) == 1000 and second[Headers.LAST_ERROR].endswith("…")
    assert first[Headers.LAST_ERROR] == "E1", "the input is not changed"


async def test_purge_on_a_tty_shows_that_it_works(tmp_path: Path, unique: str) -> None:
    url = f"sqlite:///{tmp_path / 'tty.db'}"
    async with broker_from_url(url) as broker:
        await dead_letter(broker, unique, {f"m{i}": b"{}" for i in range(3)}, "ValueError: x")
    shown = on_a_tty("dlq", "purge", unique, "--all", "--yes", broker=url)
    assert f"\rpurging dead letters of {unique!r}… 0s" in shown
    assert f"purged 3 dead letter(s) of {unique!r}" in shown
    quiet = oncely_cli("dlq", "purge", unique, "--all", "--yes", broker=url)
    assert quiet.returncode == 0 and quiet.stderr == "", "no progress off a TTY"
