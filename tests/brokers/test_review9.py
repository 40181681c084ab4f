"""Review 9: failed connects leak nothing, and operator typos create nothing (real servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import one_loop

pytestmark = [pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]


def oncely(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env.setdefault("AWS_ACCESS_KEY_ID", "oncely-test")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "oncely-test")
    env["PYTHONWARNINGS"] = "always::ResourceWarning"
    return subprocess.run(
        [sys.executable, "-X", "dev", "-m", "oncely.runtime.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "url",
    [
        "sqs://?region=us-east-1&endpoint=http://127.0.0.1:{port}",
        "amqp://guest:guest@127.0.0.1:{port}/",
        "kafka://127.0.0.1:{port}?request_timeout=2",
    ],
    ids=["sqs", "amqp", "kafka"],
)
def test_a_failed_connect_leaks_nothing(url: str) -> None:
    """The broker refuses the connection: the dlq command fails with a one-line error, and
    what connect opened is closed (SQS's aiohttp session gave 'Unclosed client session')."""
    url = url.format(port=closed_port())
    done = oncely("dlq", "list", "orders", "--broker", url)
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    assert "Unclosed" not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["oncely-attempt", "Oncely-Key", "oncely-dead-letter-reason"])
def test_publish_refuses_oncely_s_own_headers(tmp_path: Path, name: str) -> None:
    """'oncely publish --header oncely-attempt=3' would make a fresh message look like its
    third attempt (fewer retries); oncely's own headers are refused, and nothing is sent."""
    db = tmp_path / "pub.db"
    url = f"sqlite:///{db}"
    done = oncely("publish", "orders", "{}", "--header", f"{name}=3", "--broker", url)
    assert done.returncode == 2, done
    assert "reserved" in done.stderr and name in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not db.exists(), "refused before the broker was opened"
    ok = oncely("publish", "orders", "{}", "--header", "x-source=cli", "--broker", url)
    assert ok.returncode == 0, ok


@pytest.mark.parametrize(
    ("tail", "says"),
    [
        ("sub/", "names a directory"),
        ("jobs#2.db", "has a '#'"),
        ("jobs.db#", "has a '#'"),
        (":memory:", "not a file path"),
    ],
)
@pytest.mark.parametrize("kind", ["broker", "store", "outbox"])
def test_sqlite_urls_that_name_no_shared_file_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: str, says: str, kind: str
) -> None:
    """sqlite:///dir/ created a file named 'dir', '#...' was dropped (another file opened),
    and sqlite:///:memory: made a broker or store no other process can reach."""
    from oncely.brokers.registry import broker_from_url
    from oncely.errors import ConfigError
    from oncely.stores._outbox_sqlite import SqliteBackend
    from oncely.stores.registry import store_from_url

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tail}"
    with pytest.raises(ConfigError, match=says):
        if kind == "broker":
            broker_from_url(url)
        elif kind == "store":
            store_from_url(url)
        else:
            SqliteBackend(url, "outbox")
    assert list(tmp_path.iterdir()) == []


APP = """
import oncely

app = oncely.App()


@app.handler({topic!r})
async def handle(payload: dict, ctx: oncely.Context) -> None:
    pass
"""


@pytest.mark.parametrize(
    ("broker", "topic", "says"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "bad topic!", "invalid AMQP topic"),
        ("amqp://guest:guest@127.0.0.1:5672/", "amq.orders", "invalid AMQP topic"),
        ("kafka://127.0.0.1:9092", "bad topic!", "invalid Kafka topic"),
        ("kafka://127.0.0.1:9092", "t" * 245, "made from it, is too long"),
        ("sqs://?region=us-east-1&endpoint=http://127.0.0.1:9324", "bad topic!", "SQS queue"),
    ],
    ids=["amqp-char", "amqp-reserved", "kafka-char", "kafka-retry-length", "sqs-char"],
)
def test_a_handler_topic_the_broker_refuses_is_a_config_error(
    tmp_path: Path, broker: str, topic: str, says: str
) -> None:
    """'oncely run' with @app.handler("bad topic!") exited 1 with a CRITICAL log and a
    traceback once consuming failed; the broker's naming rule is checked before it connects:
    one line, exit 2."""
    (tmp_path / "badtopic_app.py").write_text(APP.format(topic=topic))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env.setdefault("AWS_ACCESS_KEY_ID", "oncely-test")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "oncely-test")
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "oncely.runtime.cli", "run", "badtopic_app:app", "--broker", broker],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "CRITICAL" not in done.stderr, done.stderr


async def _amqp_has(name: str) -> bool:
    import aio_pika
    import aiormq.exceptions

    from tests.brokers.test_amqp import AMQP_URL

    connection = await aio_pika.connect(AMQP_URL)
    try:
        async with connection.channel() as channel:
            await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        await connection.close()
    return True


async def _made(kind: str, topic: str) -> list[str]:
    """What exists of ``topic``'s topology, asked of the server directly."""
    if kind == "amqp":
        names = [topic, f"{topic}.dlq"]
        return [n for n in names if await _amqp_has(n)]
    if kind == "kafka":
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:9092")
        await admin.start()  # type: ignore[no-untyped-call]
        try:
            listed = set(await admin.list_topics())
        finally:
            await admin.close()  # type: ignore[no-untyped-call]
        return sorted(n for n in listed if n == topic or n.startswith(topic + "."))
    from tests.brokers.test_sqs import plain_client

    async with plain_client() as client:
        got = await client.list_queues(QueueNamePrefix=topic)
    return list(got.get("QueueUrls", []))


@one_loop  # the commands run in a subprocess
@pytest.mark.parametrize("kind", ["amqp", "kafka", "sqs"])
async def test_dlq_commands_on_a_misspelt_topic_create_nothing(kind: str, unique: str) -> None:
    """'oncely dlq list|show|replay|purge' on a topic the broker does not have refused
    nothing and created its topology (8 queues on RabbitMQ, <topic>.dlq on Kafka, the queue
    and DLQ on SQS). Now: one line, exit 2, nothing created; an existing topic still works."""
    from oncely.brokers.registry import broker_from_url
    from tests.brokers.kafka_support import KAFKA_URL
    from tests.brokers.test_amqp import AMQP_URL
    from tests.brokers.test_sqs import SQS_URL, delete_queues

    url = {"amqp": AMQP_URL, "kafka": KAFKA_URL, "sqs": SQS_URL}[kind]
    typo = f"{unique}-typo"
    commands = [
        ["dlq", "list", typo],
        ["dlq", "show", typo, "some-id"],
        ["dlq", "replay", typo, "--all"],
        ["dlq", "purge", typo, "--older-than", "1d"],
    ]
    try:
        for command in commands:
            done = oncely(*command, "--broker", url)
            assert done.returncode == 2, done
            assert f"no such topic/dead-letter queue: {typo!r}" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
        assert await _made(kind, typo) == []
        async with broker_from_url(url) as broker:
            await broker.publish(unique, b"{}")  # the real topic now exists
        done = oncely("dlq", "list", unique, "--format", "json", "--broker", url)
        assert done.returncode == 0, done
        assert f"0 dead letter(s) in {unique!r}" in done.stderr
    finally:
        if kind == "sqs":
            await delete_queues([unique, typo])
