"""Embedding: a worker inside an application that already owns the event loop.

A tiny HTTP server (standing in for your ASGI server) accepts `POST /orders` and publishes
through `app.publish`; the worker consumes in the same loop. No signal handlers are installed
by oncely here: the application decides when to stop, and `Worker.__aexit__` drains.

    python examples/embedded.py            # then: curl -XPOST localhost:8080/orders -d '{...}'
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

import oncely
from examples.orders import Order, app


async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    head = request.decode("latin-1").split("\r\n")
    length = next(
        (int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")), 0
    )
    body = await reader.readexactly(length)
    if head[0].startswith("POST /orders"):
        try:
            order = msgspec.json.decode(body, type=Order)
        except msgspec.DecodeError as exc:
            status, reply = "400 Bad Request", str(exc).encode()
        else:
            # The key makes a client's retried POST harmless: the handler runs once.
            message_id = await app.publish("orders", order, key=order.id)
            status, reply = "202 Accepted", message_id.encode()
    else:
        status, reply = "404 Not Found", b""
    writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(reply)}\r\n\r\n".encode() + reply)
    await writer.drain()
    writer.close()


async def serve(
    port: int,
    broker: str = "sqlite:///.demo/embedded.db",
    ready: asyncio.Event | None = None,
) -> None:
    async with oncely.Worker(app, broker=broker):
        server = await asyncio.start_server(handle_http, "127.0.0.1", port)
        async with server:
            if ready is not None:
                ready.set()
            await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(serve(8080))
    except KeyboardInterrupt:
        pass
