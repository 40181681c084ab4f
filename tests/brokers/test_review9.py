"""Review 9: failed connects leak nothing, and operator typos create nothing (real servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
