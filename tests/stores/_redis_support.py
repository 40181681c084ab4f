"""What the Redis store tests share: server URLs, and private redis-server processes for the
tests that stop a server (the shared ones are never stopped)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
from anyio.abc import Process
from redis.asyncio import Redis

from oncely.stores._redis_batch import Pipeliner

REDIS_URL = os.environ.get("ONCELY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_URL = os.environ.get(
    "ONCELY_TEST_REDIS_CLUSTER_URL",
    "redis://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002/0?cluster=1",
)


def with_options(url: str, **options: str | int | float) -> str:
    """``url`` with ``options`` added to its query string."""
    return url + ("&" if "?" in url else "?") + urlencode(options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of this test's own, on a free loopback port, with its data in ``dir``.

    ``appendonly=True`` gives it an append-only file fsynced on every write, so what it
    acknowledged survives even SIGKILL; restarting it on the same directory loads it back.
    """

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.dir = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert self.process is None, "already running"
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed (run scripts/services.sh up)"
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--protected-mode", "yes", "--logfile", str(self.dir / "log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.process = await anyio.open_process(args)
        deadline = time.monotonic() + 10
        while not await self._answers():
            if self.process.returncode is not None or time.monotonic() > deadline:
                log = (self.dir / "log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"private redis-server on {self.port} did not start:\n{log}")
            await anyio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.kill()
        await process.wait()
        await process.aclose()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    async def _answers(self) -> bool:
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except Exception:
            return False
        finally:
            await client.aclose()


@contextlib.asynccontextmanager
async def private_redis(
    directory: Path, *, appendonly: bool = False
) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(directory, appendonly=appendonly)
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            with contextlib.suppress(ProcessLookupError):
                server.resume()
            await server.kill()


def batch_connection(store: Any) -> Any:
    """The redis-py connection a standalone ``RedisStore`` sends its batches on."""
    wire = store._wire
    assert wire is not None, "a standalone store batches on its own connection"
    return wire._conn


def reading(store: Any) -> asyncio.Event:
    """An event set once ``store``'s batch connection has written a command and waits for its
    reply: the batch is out."""
    wire = store._wire
    assert wire is not None, "a standalone store batches on its own connection"
    event = asyncio.Event()
    put = wire._put

    def spy(link: Any, packed: bytes, waiter: Any) -> None:
        put(link, packed, waiter)
        event.set()

    wire._put = spy
    return event


def spawned_batches(monkeypatch: Any) -> list[int]:
    """The sizes of the batches ``Pipeliner`` puts on a task of their own, from now on (the
    fast path sends a batch from its callback and answers it from the connection: none)."""
    spawned: list[int] = []
    spawn = Pipeliner._spawn

    def counted(self: Any, batch: Any) -> None:
        spawned.append(len(batch))
        spawn(self, batch)

    monkeypatch.setattr(Pipeliner, "_spawn", counted)
    return spawned


def cut_batch(store: Any, path: str, caller: asyncio.Future[Any]) -> None:
    """Cancel the batch out now the way a shutdown does: its task on the task ``path``; on the
    fast path, which has no task of its own, its ``caller``."""
    if path == "task":
        [batch] = store._batch._tasks
        batch.cancel()  # what a loop shutting down does to the batch task
    else:
        assert not store._batch._tasks
        caller.cancel()  # no task of its own: its caller is what a shutdown cancels
