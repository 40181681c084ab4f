"""Handlers the Kafka tests run in worker processes (``oncely run tests.brokers.kafka_app:app``).

Environment: ``KAFKA_APP_TOPIC`` (input topic), ``KAFKA_APP_OUT`` (output topic of the
exactly-once copy), ``KAFKA_APP_LOG`` (file each handled message id and the worker's pid
are appended to, one line per run of the handler), ``KAFKA_APP_SLEEP`` (seconds each
``record`` run lingers).
A message whose body is ``hold`` never completes.
"""

from __future__ import annotations

import asyncio
import os

import oncely

TOPIC = os.environ.get("KAFKA_APP_TOPIC", "kafka-app-in")
OUT = os.environ.get("KAFKA_APP_OUT", "kafka-app-out")
LOG = os.environ.get("KAFKA_APP_LOG", "")
SLEEP = float(os.environ.get("KAFKA_APP_SLEEP", "0"))

app = oncely.App("kafka-app")
_fd: int | None = None


def _log(line: str) -> None:
    global _fd
    if not LOG:
        return
    if _fd is None:
        _fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One write per line with O_APPEND: lines of several processes never interleave.
    os.write(_fd, f"{line}\n".encode())


@app.handler(TOPIC, name="record", concurrency=16, timeout=600)
async def record(body: bytes, ctx: oncely.Context) -> None:
    if body == b"hold":
        await asyncio.Event().wait()
    if SLEEP:
        await asyncio.sleep(SLEEP)
    _log(f"{ctx.delivery.id} {os.getpid()}")


@app.handler(TOPIC, name="copy", concurrency=32, timeout=600)
async def copy(body: bytes, ctx: oncely.Context) -> None:
    await ctx.produce(OUT, body, key=ctx.headers.get("oncely-key"))
    _log(f"{ctx.delivery.id} {os.getpid()}")
