"""The examples README points at keep working."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from examples import embedded, orders
from tests._wait import eventually

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def post(port: int, body: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    reply = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return head.split(b"\r\n")[0].decode(), reply


@pytest.mark.anyio
async def test_embedded_worker_next_to_an_http_server(tmp_path: Path) -> None:
    orders.placed.clear()
    port, ready = free_port(), asyncio.Event()
    server = asyncio.create_task(embedded.serve(port, f"sqlite:///{tmp_path}/e.db", ready))
    await asyncio.wait_for(ready.wait(), 10)
    body = b'{"id": "web-1", "sku": "s", "qty": 2}'
    first, second = await post(port, body), await post(port, body)  # a client retry
    assert first[0] == second[0] == "HTTP/1.1 202 Accepted"
    assert (await post(port, b'{"id": 1}'))[0] == "HTTP/1.1 400 Bad Request"
    await eventually(lambda: "web-1" in orders.placed)
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server
    assert orders.placed == {"web-1": 1}


def test_make_demo_script_prints_the_summary(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "processed             11" in out.stdout
    assert "duplicates absorbed    3" in out.stdout
    assert "retried                2" in out.stdout
    assert "dead-lettered          1" in out.stdout
    assert "max effects per order: 1" in out.stdout
