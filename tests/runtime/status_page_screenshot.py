"""Take the README's screenshot of the status page: a worker on the SQLite broker running a
realistic mix (orders with duplicates, flaky payments that retry, a poison e-mail that goes to
the dead-letter queue), shown in headless Chromium.

    .venv/bin/python -m tests.runtime.status_page_screenshot docs/status-page.png
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
from pathlib import Path

import oncely
from oncely.runtime._page import RATE_WINDOW
from tests._wait import eventually
from tests.runtime._chromium import Browser


def build_app(rng: random.Random) -> oncely.App:
    app = oncely.App()
    retry = oncely.RetryPolicy(max_attempts=4, base=0.2, cap=1.0)

    @app.handler("orders", name="shop.place_order", idempotent=True, key="payload:id")
    async def place_order(_: dict[str, int]) -> None:
        await asyncio.sleep(rng.uniform(0.005, 0.04))

    @app.handler("payments", name="billing.charge", retry=retry, concurrency=8)
    async def charge(_: dict[str, int]) -> None:
        await asyncio.sleep(rng.uniform(0.02, 0.12))
        if rng.random() < 0.08:
            raise RuntimeError("card network timeout")

    @app.handler("emails", name="mail.send_receipt", concurrency=4)
    async def send_receipt(msg: dict[str, str]) -> None:
        if "@" not in msg["to"]:
            raise oncely.Reject(f"not an address: {msg['to']!r}")
        await asyncio.sleep(rng.uniform(0.002, 0.01))

    return app


async def main() -> bytes:
    """The PNG."""
    rng = random.Random(7)
    app = build_app(rng)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # a short database path on the page
        async with oncely.Worker(app, broker="sqlite:///shop.db") as worker:
            port = await worker.serve_http(0)
            stop = asyncio.Event()

            async def traffic() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    await app.publish("orders", {"id": n})
                    if n % 7 == 0:  # the shop's client resends now and then
                        await app.publish("orders", {"id": n - 3})
                    await app.publish("payments", {"order": n})
                    to = "nobody" if n == 40 else f"customer{n}@example.com"
                    await app.publish("emails", {"to": to})
                    await asyncio.sleep(0.02)

            producer = asyncio.create_task(traffic())
            stats = worker.handler_stats
            await eventually(
                lambda: (
                    stats["mail.send_receipt"].dead_lettered >= 1
                    and stats["billing.charge"].retried >= 3
                    and stats["shop.place_order"].duplicates >= 5
                ),
                within=120,
            )
            async with Browser(1280, 900) as browser:
                page = await browser.open(f"http://127.0.0.1:{port}/")
                await page.until(f"Number(document.body.dataset.ticks) > {RATE_WINDOW + 1}")
                png = await page.screenshot()
                if page.errors:
                    raise SystemExit(f"page errors: {page.errors}")
            stop.set()
            await producer
    return png


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png").resolve()
    out.write_bytes(asyncio.run(main()))
