"""Structured logs from ``oncely run``, in a subprocess: JSON lines when stderr is not a TTY,
readable lines on a pseudo-terminal, message fields on every line about a message, payloads
never logged unless asked for, and ``--log-level`` leaving the root logger alone."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import oncely
from oncely._logging import MESSAGE, LogFormatter, MessageFilter, redact_values
from oncely.brokers.base import ALL, DeadLetterAdmin
from oncely.brokers.registry import broker_from_url
from tests._wait import eventually
from tests.runtime._faulty import WrappedBroker

pytestmark = pytest.mark.anyio

SECRET = "sk_live_4242_NOTE"  # in a valid order's note
SECRET_ENUM = "sk_live_4242_KIND"  # an invalid enum value: msgspec quotes it in its error
SECRET_CUT = "sk_live_4242_CUT"  # in a truncated body
MESSAGE_FIELDS = {"handler", "topic", "message_id", "key", "attempt"}

APP = """
import logging
import os
from typing import Literal

import msgspec

import oncely

app = oncely.App()


class Order(msgspec.Struct):
    kind: Literal["card", "cash"]
    note: str


@app.handler(os.environ["LOGAPP_TOPIC"], retry=oncely.RetryPolicy(max_attempts=2, base=0.01))
async def handle(order: Order) -> None:
    logging.getLogger("logapp").warning("handling; root level %d", logging.getLogger().level)
    logging.getLogger("logapp.chatty").info("not shown: the root logger stays at WARNING")
    raise ValueError("downstream refused")
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def run_worker(
    tmp_path: Path, topic: str, *flags: str, tty: bool = False, env: dict[str, str] | None = None
) -> str:
    """Publish a valid order, an invalid one and a truncated one; run ``oncely run`` until
    all three are dead letters; stop it with SIGTERM and return its output (stderr and
    stdout)."""
    (tmp_path / "logapp.py").write_text(APP)
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    async with broker_from_url(url) as broker:
        await broker.publish(topic, json.dumps({"kind": "card", "note": SECRET}).encode())
        await broker.publish(topic, json.dumps({"kind": SECRET_ENUM, "note": "x"}).encode())
        await broker.publish(topic, f'{{"kind": "card", "note": "{SECRET_CUT}'.encode())
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    cmd = [sys.executable, "-m", "oncely", "run", "logapp:app", "--broker", url, *flags]
    full_env = {**clean, "LOGAPP_TOPIC": topic, **(env or {})}
    chunks: list[bytes] = []
    if tty:
        leader, follower = pty.openpty()
        proc = start(cmd, tmp_path, full_env, follower)
        os.close(follower)
        reader = threading.Thread(target=_drain, args=(leader, chunks))
    else:
        proc = start(cmd, tmp_path, full_env, subprocess.PIPE)
        assert proc.stdout is not None
        reader = threading.Thread(target=_drain, args=(proc.stdout.fileno(), chunks))
    reader.start()
    try:
        async with broker_from_url(url) as broker:
            assert isinstance(broker, DeadLetterAdmin)
            deadline = time.monotonic() + 60
            letters = await broker.dead_letters(topic, limit=ALL)
            while len(letters) < 3 and proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                letters = await broker.dead_letters(topic, limit=ALL)
            assert len(letters) == 3, b"".join(chunks).decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=60)
        if tty:
            os.close(leader)
        elif proc.stdout is not None:
            proc.stdout.close()
    return b"".join(chunks).decode()


def start(cmd: list[str], cwd: Path, env: dict[str, str], out: int) -> subprocess.Popen[bytes]:
    """Both streams to ``out``: a payload must show up in neither."""
    stderr = subprocess.STDOUT if out == subprocess.PIPE else out
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=stderr)


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other end closed
            return
        if not chunk:
            return
        chunks.append(chunk)


def assert_no_secret(output: str) -> None:
    for secret in (SECRET, SECRET_ENUM, SECRET_CUT):
        assert secret not in output, f"{secret} leaked into the logs"


async def test_json_lines_when_not_a_tty(tmp_path: Path, unique: str) -> None:
    output = await run_worker(tmp_path, unique)
    lines = [json.loads(line) for line in output.splitlines()]  # every line is JSON
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert_no_secret(output)

    # Lines about a message carry its fields: oncely's own and the handler's.
    failed = [x for x in lines if "failed on attempt" in x["msg"]]
    user = [x for x in lines if x["logger"] == "logapp"]
    dead = [x for x in lines if "dead-lettering" in x["msg"]]
    assert len(failed) == 2 and len(user) == 2 and len(dead) == 3
    for line in failed + user + dead:
        assert MESSAGE_FIELDS <= set(line), line
        assert line["topic"] == unique and line["handler"] == "logapp.handle"
        assert line["message_id"] in line["msg"] or line["logger"] == "logapp"
    assert [x["attempt"] for x in user] == [1, 2]
    assert len({x["message_id"] for x in failed + user}) == 1
    # ...and lines about no message do not.
    started = [x for x in lines if x["msg"].startswith("worker started")]
    assert len(started) == 1 and not MESSAGE_FIELDS & set(started[0])

    # The decode error keeps its path but not the value it quoted.
    [enum_line] = [x for x in dead if "Invalid enum value" in x["msg"]]
    assert "<redacted>" in enum_line["msg"] and "$.kind" in enum_line["msg"]

    # --log-level is oncely's: the root logger keeps Python's default (WARNING), so another
    # logger's INFO line is not shown.
    assert all(x["msg"] == "handling; root level 30" for x in user)
    assert "not shown" not in output


async def test_readable_lines_on_a_tty(tmp_path: Path, unique: str) -> None:
    output = await run_worker(tmp_path, unique, tty=True)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and not any(line.lstrip().startswith("{") for line in lines)
    assert_no_secret(output)
    user = [line for line in lines if " WARNING logapp: handling" in line]
    assert len(user) == 2
    assert all(f"handler=logapp.handle topic={unique} message_id=" in x for x in user)
    assert "attempt=1]" in user[0] and "attempt=2]" in user[1]


async def test_payloads_only_when_asked_and_the_format_setting(tmp_path: Path, unique: str) -> None:
    # ONCELY_LOG_FORMAT=json wins over the TTY; --log-payloads adds each message's body.
    output = await run_worker(
        tmp_path, unique, "--log-payloads", tty=True, env={"ONCELY_LOG_FORMAT": "json"}
    )
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    user = [x for x in lines if x["logger"] == "logapp"]
    assert len(user) == 2 and all(SECRET in x["payload"] for x in user)
    assert all("payload" in x for x in lines if "message_id" in x)


def test_formatter_for_embedding_apps() -> None:
    """What an application that embeds the worker puts on its own handler."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter("json"))
    handler.addFilter(MessageFilter())
    logger = logging.getLogger("embedding-test")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside", extra={"order": 7})

        class _D(oncely.Delivery):
            settled = False

            async def ack(self) -> None: ...
            async def nack(
                self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
            ) -> None: ...
            async def reject(self, reason: str) -> None: ...
            async def extend(self, seconds: float) -> None: ...

        d = _D(
            id="m1",
            topic="t",
            body=b"secret",
            headers={"oncely-key": "k1"},
            attempt=3,
            enqueued_at=0.0,
        )
        token = MESSAGE.set(["h", d])
        try:
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("inside")
        finally:
            MESSAGE.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["msg"] == "outside" and outside["order"] == 7
    assert not MESSAGE_FIELDS & set(outside)
    assert {k: inside[k] for k in MESSAGE_FIELDS} == {
        "handler": "h",
        "topic": "t",
        "message_id": "m1",
        "key": "k1",
        "attempt": 3,
    }
    assert "RuntimeError: boom" in inside["exc"] and "secret" not in stream.getvalue()


def test_redact_values_keeps_paths() -> None:
    assert redact_values("Invalid enum value 'x1' - at `$.kind`") == (
        "Invalid enum value <redacted> - at `$.kind`"
    )
    assert redact_values("Invalid enum value 12345") == "Invalid enum value <redacted>"
    assert redact_values("Object contains unknown field `pw`") == (
        "Object contains unknown field `<redacted>`"
    )
    assert redact_values("Expected `int`, got `str` - at `$.a`") == (
        "Expected `int`, got `str` - at `$.a`"
    )


def test_importing_oncely_configures_no_logging() -> None:
    code = (
        "import logging, oncely, oncely.runtime.cli; r = logging.getLogger(); "
        "print(r.level, len(r.handlers), logging.getLogger('oncely').level)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["30", "0", "0"]


async def test_heartbeat_lines_carry_the_message_fields(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat beats each delivery in a task of its own: its lines about the second
    delivery carry the second's fields, although its timer task was started (and so its
    context copied) while the first one ran."""
    app = oncely.App()
    releases = {"k-1": asyncio.Event(), "k-2": asyncio.Event()}

    @app.handler(unique, visibility=0.1, timeout=30)
    async def slow(_: dict[str, int], ctx: oncely.Context) -> None:
        await releases[ctx.delivery.key].wait()

    def refuse(delivery: oncely.Delivery) -> None:
        if delivery.key == "k-2":
            raise oncely.ConnectionLost("broker away")

    broker = WrappedBroker(broker_from_url(f"memory://{unique}"), on_extend=refuse)
    caplog.handler.addFilter(MessageFilter())
    caplog.set_level(logging.INFO, logger="oncely")
    formatter = LogFormatter("json")
    async with oncely.Worker(app, broker=broker) as worker:
        await app.publish(unique, {"n": 1}, key="k-1")
        await eventually(lambda: sum(broker.extends.values()) >= 1)
        releases["k-1"].set()
        await eventually(lambda: worker.stats.processed == 1)
        second = await app.publish(unique, {"n": 2}, key="k-2")
        await eventually(lambda: worker.stats.heartbeat_errors >= 1)
        releases["k-2"].set()
        await eventually(lambda: worker.stats.processed == 2)
    beats = [
        json.loads(formatter.format(r))
        for r in caplog.records
        if "could not extend" in r.getMessage()
    ]
    assert beats
    assert {k: beats[0][k] for k in MESSAGE_FIELDS - {"handler"}} == {
        "topic": unique,
        "message_id": second,
        "key": "k-2",
        "attempt": 1,
    }
    assert beats[0]["handler"].endswith("slow")


async def test_lines_carry_the_idempotency_key_the_runtime_extracted(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``key="payload:order_id"`` the key is in the payload, not in a header: lines
    logged after extraction carry it."""
    app = oncely.App()

    @app.handler(
        unique, idempotent=True, key="payload:order_id", retry=oncely.RetryPolicy(base=0.01)
    )
    async def charge(order: dict[str, str], ctx: oncely.Context) -> None:
        logging.getLogger("charge").warning("charging")
        if ctx.attempt == 1:
            raise ValueError("card declined")

    caplog.handler.addFilter(MessageFilter())
    caplog.set_level(logging.INFO)
    formatter = LogFormatter("json")
    broker = f"memory://{unique}"
    async with oncely.Worker(app, broker=broker, store=broker) as worker:
        message_id = await app.publish(unique, {"order_id": "order-1042"})
        await eventually(lambda: worker.stats.processed == 1)
    lines = [json.loads(formatter.format(r)) for r in caplog.records]
    about = [x for x in lines if x.get("message_id") == message_id]
    assert {x["msg"] for x in about} >= {"charging"}
    assert any("failed on attempt 1" in x["msg"] for x in about)
    assert all(x["key"] == "order-1042" for x in about), about
