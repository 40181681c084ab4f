"""``DeadLetterAdmin`` (list, get, replay, paced replay, purge) on every broker, against the
real servers (RabbitMQ, ElasticMQ, Kafka; never skipped), and ``oncely dlq`` through the CLI
in subprocesses (SQLite for every command; RabbitMQ for list and show).

Dead letters are made the way workers make them: consume and ``reject(reason)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from oncely.brokers.base import ALL, Broker, DeadLetterAdmin, Headers
from oncely.brokers.registry import broker_from_url
from oncely.runtime._cli_dlq import letter_json, parse_rate, table
from oncely.runtime._cli_outbox import parse_duration
from tests.brokers.kafka_support import kafka_url
from tests.brokers.test_amqp import AMQP_URL, delete_topology
from tests.brokers.test_sqs import SQS_URL, delete_queues

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
BROKERS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("amqp", marks=pytest.mark.amqp),
    pytest.param("sqs", marks=pytest.mark.sqs),
    pytest.param("kafka", marks=pytest.mark.kafka),
]


@pytest.fixture
def anyio_backend() -> str:
    # Admin calls do not depend on the loop; the conformance suites cover uvloop.
    return "asyncio"


@pytest.fixture
async def admin(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[tuple[Broker, str]]:
    """A connected broker of the kind named by the parameter, and a fresh topic."""
    kind: str = request.param
    url = {
        "memory": f"memory://{unique}",
        "sqlite": f"sqlite:///{tmp_path / 'q.db'}",
        "amqp": AMQP_URL,
        "sqs": SQS_URL,
        "kafka": kafka_url(),
    }[kind]
    broker = broker_from_url(url)
    try:
        async with broker:
            yield broker, unique
    finally:
        if kind == "amqp":
            await delete_topology(unique)
        elif kind == "sqs":
            await delete_queues([unique])


async def dead_letter(broker: Broker, topic: str, bodies: dict[str, bytes], reason: str) -> None:
    """Publish ``bodies`` (id -> body), consume each once and reject it with ``reason``."""
    for mid, body in bodies.items():
        await broker.publish(topic, body, message_id=mid, headers={"x-app": "test"})
    async with broker.consume(topic, prefetch=len(bodies), visibility=60) as sub:
        async with asyncio.timeout(60):
            for _ in bodies:
                delivery = await anext(sub)
                await delivery.reject(f"{reason} {delivery.id}")


async def take(broker: Broker, topic: str, n: int) -> list[Any]:
    """Consume ``n`` deliveries of ``topic`` and ack them."""
    got = []
    async with broker.consume(topic, prefetch=n, visibility=60) as sub:
        async with asyncio.timeout(60):
            for _ in range(n):
                delivery = await anext(sub)
                got.append((delivery.id, delivery.attempt, dict(delivery.headers), delivery.body))
                await delivery.ack()
    return got


async def after(moment: float) -> None:
    """Wait until the wall clock is past ``moment`` (dead-letter times are wall-clock): the
    condition is the clock itself, so one sleep of the time left is the bounded wait."""
    await asyncio.sleep(max(moment - time.time(), 0.0) + 0.01)
    assert time.time() > moment


@pytest.mark.parametrize("admin", BROKERS, indirect=True)
async def test_list_show_purge_replay_on_every_broker(admin: tuple[Broker, str]) -> None:
    broker, topic = admin
    assert isinstance(broker, DeadLetterAdmin)
    old = {f"old-{i}": f"old body {i}".encode() for i in range(3)}
    new = {"new-0": b"\xff\xfe binary", "new-1": b'{"n": 1}', "new-2": b"third"}
    await dead_letter(broker, topic, old, "boom")
    boundary = time.time()
    await after(boundary + 1.0)
    await dead_letter(broker, topic, new, "later")

    # list: every dead letter, oldest first (SQS and Kafka may consume a batch in another
    # order, so order is checked between the batches), with reason, attempt and time
    letters = await broker.dead_letters(topic, limit=ALL)
    ids = [x.id for x in letters]
    assert set(ids[:3]) == set(old) and set(ids[3:]) == set(new)
    assert [x.failed_at for x in letters] == sorted(x.failed_at for x in letters)
    assert all(x.reason.split() == [x.reason.split()[0], x.id] for x in letters)
    assert all(x.attempt == 1 and x.first_error == x.reason for x in letters)
    assert [x.id for x in await broker.dead_letters(topic, limit=2)] == ids[:2]

    # get: body and headers of one, None for an unknown id
    shown = await broker.get(topic, "new-0")
    assert shown is not None and shown.body == b"\xff\xfe binary"
    assert shown.headers["x-app"] == "test"
    assert await broker.get(topic, "no-such-id") is None

    # purge --older-than: only the letters before the boundary go (the cutoff is midway
    # between the batches, >= 0.5 s from each)
    middle = (letters[2].failed_at + letters[3].failed_at) / 2
    purged = await broker.purge(topic, older_than=time.time() - middle)
    assert purged == 3
    assert sorted(x.id for x in await broker.dead_letters(topic, limit=ALL)) == sorted(new)

    # replay one id: back on the topic, attempt reset, replay headers set
    assert await broker.replay(topic, ids=["new-1"]) == 1
    [(mid, attempt, headers, body)] = await take(broker, topic, 1)
    assert (mid, attempt, body) == ("new-1", 1, b'{"n": 1}')
    assert headers[Headers.REPLAY_COUNT] == "1"
    assert float(headers[Headers.REPLAYED_AT]) >= boundary
    assert Headers.REASON not in headers and headers["x-app"] == "test"

    # replay the rest, paced: 1 a second, so chunks of 1, progress after each chunk
    rest = [x.id for x in await broker.dead_letters(topic, limit=ALL)]
    assert sorted(rest) == ["new-0", "new-2"]
    seen: list[tuple[int, int]] = []
    moved = await broker.replay_paced(
        topic, rest, rate=1, progress=lambda done, total: seen.append((done, total))
    )
    assert moved == 2 and seen == [(1, 2), (2, 2)]
    assert await broker.dead_letters(topic) == []
    back = sorted(await take(broker, topic, 2))
    assert [(m, a, b) for m, a, _, b in back] == [
        ("new-0", 1, b"\xff\xfe binary"),
        ("new-2", 1, b"third"),
    ]

    # a replayed message that fails again counts its replays
    await broker.publish(topic, b"x", message_id="again")
    async with broker.consume(topic, prefetch=1, visibility=60) as sub:
        delivery = await anext(sub)
        await delivery.reject("once")
    assert await broker.replay(topic, ids=["again"]) == 1
    async with broker.consume(topic, prefetch=1, visibility=60) as sub:
        delivery = await anext(sub)
        await delivery.reject("twice")
    assert await broker.replay(topic, ids=["again"]) == 1
    [(_, _, headers, _)] = await take(broker, topic, 1)
    assert headers[Headers.REPLAY_COUNT] == "2"

    # purge everything; nothing left, and a second purge is a no-op
    await dead_letter(broker, topic, {"last": b"z"}, "end")
    assert await broker.purge(topic) == 1
    assert await broker.purge(topic) == 0
    assert await broker.dead_letters(topic) == []


# ------------------------------------------------------------------------------ the CLI


def oncely(*args: str, broker: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    return subprocess.run(
        [sys.executable, "-m", "oncely.runtime.cli", *args, "--broker", broker],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


async def test_cli_commands_on_sqlite(tmp_path: Path, unique: str) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    topic = unique
    async with broker_from_url(url) as broker:
        await dead_letter(broker, topic, {"a": b"aa", "b": b"\x80bin"}, "early")
        await dead_letter(broker, topic, {f"c{i}": b"{}" for i in range(4)}, "late")
    # The early two were dead-lettered 8 days ago, as far as the file says.
    with sqlite3.connect(tmp_path / "cli.db") as db:
        db.execute(
            "UPDATE oncely_dead_letters SET failed_at = failed_at - 8 * 86400"
            " WHERE msg_id IN ('a', 'b')"
        )

    # list: one JSON object per line with the stable keys
    out = oncely("dlq", "list", topic, broker=url)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c0", "c1", "c2", "c3"]
    assert rows[0]["reason"] == rows[0]["last_error"] == rows[0]["first_error"] == "early a"
    assert rows[0]["attempt"] == 1 and rows[0]["age_s"] >= 8 * 86400 > rows[2]["age_s"]
    assert "6 dead letter(s)" in out.stderr

    # show: UTF-8 body as text, other bytes as base64, said so; unknown id exits 2
    shown = json.loads(oncely("dlq", "show", topic, "a", broker=url).stdout)
    assert (shown["body"], shown["body_encoding"]) == ("aa", "utf-8")
    assert shown["headers"]["x-app"] == "test"
    shown = json.loads(oncely("dlq", "show", topic, "b", broker=url).stdout)
    assert (shown["body"], shown["body_encoding"]) == ("gGJpbg==", "base64")
    text = oncely("dlq", "show", topic, "b", "--format", "table", broker=url).stdout
    assert "body (not UTF-8; base64):\ngGJpbg==" in text
    missing = oncely("dlq", "show", topic, "zz", broker=url)
    assert missing.returncode == 2 and "no dead letter 'zz'" in missing.stderr

    # purge --older-than takes the two early ones; --all needs --yes
    out = oncely("dlq", "purge", topic, "--older-than", "7d", broker=url)
    assert out.returncode == 0 and "purged 2 " in out.stdout, out.stderr
    refused = oncely("dlq", "purge", topic, "--all", broker=url)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    for bad in ("forever", "soon"):
        refused = oncely("dlq", "purge", topic, "--older-than", bad, broker=url)
        assert refused.returncode == 2 and "like 30s, 15m, 12h or 7d" in refused.stderr

    # replay needs --id or --all
    bare = oncely("dlq", "replay", topic, broker=url)
    assert bare.returncode == 2 and "--id" in bare.stderr
    out = oncely("dlq", "replay", topic, "--id", "c0", "--id", "nope", broker=url)
    assert out.returncode == 2 and "replayed 1 " in out.stdout and "1 of the 2" in out.stderr
    out = oncely("dlq", "replay", topic, "--all", "--rate", "100/s", broker=url)
    assert out.returncode == 0 and "replayed 3 " in out.stdout, out.stderr
    assert out.stderr == "", "no progress on a non-TTY"

    async with broker_from_url(url) as broker:
        assert isinstance(broker, DeadLetterAdmin)
        assert await broker.dead_letters(topic) == []
        got = await take(broker, topic, 4)
    assert sorted(m for m, *_ in got) == ["c0", "c1", "c2", "c3"]
    assert all(a == 1 and h[Headers.REPLAY_COUNT] == "1" for _, a, h, _ in got)


@pytest.mark.amqp
async def test_cli_list_and_show_on_rabbitmq(unique: str) -> None:
    try:
        async with broker_from_url(AMQP_URL) as broker:
            await dead_letter(broker, unique, {"m1": b"hello"}, "bad")
        out = oncely("dlq", "list", unique, broker=AMQP_URL)
        assert out.returncode == 0, out.stderr
        [row] = [json.loads(line) for line in out.stdout.splitlines()]
        assert (row["id"], row["reason"], row["body"]) == ("m1", "bad m1", "hello")
        shown = json.loads(oncely("dlq", "show", unique, "m1", broker=AMQP_URL).stdout)
        assert shown["headers"][Headers.REASON] == "bad m1"
        # listing and showing left it in place
        async with broker_from_url(AMQP_URL) as broker:
            assert isinstance(broker, DeadLetterAdmin)
            assert [x.id for x in await broker.dead_letters(unique)] == ["m1"]
    finally:
        await delete_topology(unique)


# ------------------------------------------------------------------------ parsing, format


def test_rates_and_durations_parse_or_fail_precisely() -> None:
    assert parse_rate("50/s") == 50 and parse_rate("0.5") == 0.5
    for bad in ("0/s", "fast", "-1", "5/m"):
        with pytest.raises(Exception, match="--rate"):
            parse_rate(bad)
    assert parse_duration("7d") == 7 * 86400 and parse_duration("15m") == 900
    assert parse_duration("30s") == 30 and parse_duration("12h") == 43200


def test_table_is_aligned_and_json_has_stable_keys() -> None:
    from oncely.brokers.base import DeadLetter

    now = time.time()
    letters = [
        DeadLetter("id-1", "t", b"x", {}, "ValueError: bad", 3, now - 7200),
        DeadLetter("a-much-longer-id", "t", b"y", {Headers.FIRST_ERROR: "E1"}, "E2", 5, now - 5),
    ]
    lines = table(letters, now).splitlines()
    assert lines[0].split() == [
        "ID",
        "ATTEMPT",
        "AGE",
        "LAST",
        "ERROR",
        "(REASON)",
        "FIRST",
        "ERROR",
    ]
    column = lines[0].index("ATTEMPT")
    assert [line[column] for line in lines[1:]] == ["3", "5"]
    assert "2.0h" in lines[1] and "-" in lines[1].split()[-1] and lines[2].endswith("E1")
    assert set(letter_json(letters[0], now)) == {
        "id",
        "topic",
        "reason",
        "attempt",
        "first_error",
        "last_error",
        "failed_at",
        "age_s",
        "body",
        "body_encoding",
        "headers",
    }
    assert letter_json(letters[0], now)["first_error"] is None


def on_a_tty(*args: str, broker: str) -> str:
    """Run ``oncely`` with stdout and stderr on a pseudo-terminal; return what it showed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oncely.runtime.cli", *args, "--broker", broker],
            stdout=follower,
            stderr=follower,
            env=env,
            cwd=ROOT,
        )
    finally:
        os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode()


async def test_cli_on_a_tty_shows_a_table_and_progress(tmp_path: Path, unique: str) -> None:
    url = f"sqlite:///{tmp_path / 'tty.db'}"
    async with broker_from_url(url) as broker:
        await dead_letter(broker, unique, {f"m{i}": b"{}" for i in range(3)}, "ValueError: x")
    lines = on_a_tty("dlq", "list", unique, broker=url).splitlines()
    assert lines[0].split()[:3] == ["ID", "ATTEMPT", "AGE"]
    assert [line.split()[0] for line in lines[1:4]] == ["m0", "m1", "m2"]
    shown = on_a_tty("dlq", "replay", unique, "--all", "--rate", "2/s", broker=url)
    # chunks of 2 at 2/s: progress after each chunk, then the result
    assert "replayed 2/3" in shown and "replayed 3/3" in shown
    assert "replayed 3 message(s)" in shown
