"""A minimal HTTP client for the worker's endpoints, and a Prometheus text parser wrapper."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


async def get(port: int, path: str) -> tuple[int, bytes]:
    """``GET path`` on the loopback ``port``; the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await get(port, path)
    return status, json.loads(body)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus-client's own parser: every sample by name and
    sorted labels."""
    status, body = await get(port, "/metrics")
    assert status == 200, body
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def until(
    port: int, path: str, status: int, within: float = 15
) -> tuple[int, dict[str, Any]]:
    """Probe ``path`` until it answers ``status``; that answer (fail after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        got = await probe(port, path)
        if got[0] == status:
            return got
        assert time.monotonic() < deadline, f"{path} stayed {got}"
        await asyncio.sleep(0.05)
