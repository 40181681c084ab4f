"""What serving metrics costs, measured directly: CPU per request of ``/metrics``,
``/status.json`` and ``/livez``, and the idle observer's CPU per second (this process: the
worker and the client fetching, on the memory broker). ``metrics_overhead.py`` measures the
same end to end on RabbitMQ, where a machine's noise can exceed it."""

from __future__ import annotations

import asyncio
import time

import oncely

REQUESTS = 200
IDLE = 5.0


async def main() -> None:
    app = oncely.App("scrape")
    for i in range(3):

        @app.handler(f"t{i}", name=f"h{i}")
        async def handle(_: dict[str, int]) -> None: ...

    async with oncely.Worker(app, broker="memory://scrape-cost") as worker:
        port = await worker.serve_http(0, metrics=True)

        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
            writer.close()
            return data

        await get("/metrics")  # the first scrape imports prometheus_client: not counted
        for path in ("/metrics", "/status.json", "/livez"):
            started = time.process_time()
            for _ in range(REQUESTS):
                await get(path)
            per = (time.process_time() - started) / REQUESTS * 1e3
            print(f"{path:<14} {per:6.2f} ms CPU per request ({len(await get(path)):,} bytes)")
        started = time.process_time()
        await asyncio.sleep(IDLE)
        idle = (time.process_time() - started) / IDLE * 1e3
        print(f"idle observer  {idle:6.2f} ms CPU per second (loop monitor and sampler)")


if __name__ == "__main__":
    asyncio.run(main())
