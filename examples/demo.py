"""`make demo`: a worker on the embedded SQLite broker, end to end, in a few seconds.

It publishes orders (three of them twice), one poison message and one e-mail whose handler
fails twice before it succeeds, runs a worker until every message is settled, and prints what
happened.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import oncely
from examples.orders import Email, Order, app, emails_sent, placed

DB = Path(".demo/oncely-demo.db")


def fresh_database() -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{DB}{suffix}").unlink(missing_ok=True)


async def main() -> int:
    url = f"sqlite:///{DB}"
    orders = [Order(id=f"o-{n}", sku=f"sku-{n % 3}", qty=n % 4 + 1) for n in range(10)]
    async with oncely.Publisher(url) as pub:
        for order in orders:
            await pub.publish("orders", order)
        for order in orders[:3]:  # the client retried these: same id, same body
            await pub.publish("orders", order)
        await pub.publish("orders", b'{"id": "o-bad", "sku": "sku-1", "qty": ')  # truncated
        await pub.publish("emails", Email(to="ada@example.com", subject="Your order"))
    expected = len(orders) + 3 + 1 + 1  # processed + duplicates + dead letters
    started = time.monotonic()
    async with oncely.Worker(app, broker=url) as worker:
        while True:
            s = worker.stats
            if s.processed + s.duplicates + s.dead_lettered >= expected:
                break
            if time.monotonic() - started > 30:
                print("demo: timed out waiting for the worker", file=sys.stderr)
                return 1
            await asyncio.sleep(0.05)
        assert isinstance(worker.broker, oncely.DeadLetterAdmin)
        dead = await worker.broker.dead_letters("orders")
    s = worker.stats
    print(f"\noncely demo on {url} ({time.monotonic() - started:.2f}s)")
    print(
        f"  processed            {s.processed:3d}   ({len(placed)} orders placed, "
        f"max effects per order: {max(placed.values())}; e-mails sent: {len(emails_sent)})"
    )
    print(f"  duplicates absorbed  {s.duplicates:3d}")
    print(f"  retried              {s.retried:3d}")
    print(f"  dead-lettered        {s.dead_lettered:3d}")
    for letter in dead:
        print(f"    {letter.id}: {letter.reason}")
    print("\ninspect it again with: .venv/bin/oncely dlq list orders --broker " + url)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    fresh_database()
    raise SystemExit(asyncio.run(main()))
