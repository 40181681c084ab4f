"""``/readyz`` of a worker with an effectively-once handler fails while its Redis store is
unreachable (a TCP fault proxy in front of the shared Redis cuts it) and passes again after."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

import oncely
from oncely.stores.redis import RedisStore
from tests._wait import eventually
from tests.runtime._probe import probe, scrape, until, value
from tests.stores._outbox_support import FaultProxy
from tests.stores._redis_support import REDIS_URL, with_options

pytestmark = pytest.mark.anyio


async def test_an_unreachable_store_fails_readyz_for_effectively_once_handlers(
    unique: str,
) -> None:
    parts = urlsplit(REDIS_URL)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    url = with_options(
        f"redis://127.0.0.1:{proxy.listen_port}/0", socket_timeout=1, connect_timeout=1
    )
    app = oncely.App()

    @app.handler(unique, name="pay", idempotent=True, key="payload:id")
    async def pay(_: dict[str, str]) -> None: ...

    try:
        async with RedisStore(url) as store:
            worker = oncely.Worker(app, broker=f"memory://{unique}", store=store)
            worker.observer.interval = 0.1
            async with worker:
                port = await worker.serve_http(0)
                await eventually(lambda: worker.observer.store_ok is not None)
                status, body = await probe(port, "/readyz")
                assert status == 200 and body["checks"]["store"]["ok"] is True, body
                assert body["checks"]["store"]["detail"].startswith("ping "), body
                proxy.cut()
                _, body = await until(port, "/readyz", 503)
                assert body["reason"].startswith("store: ping "), body
                assert body["checks"]["broker"]["ok"] is True  # only the store is down
                samples = await scrape(port)
                assert value(samples, "oncely_worker_ready") == 0
                proxy.restore()
                await until(port, "/readyz", 200, within=30)
                await app.publish(unique, {"id": unique})  # a key no earlier run completed
                await eventually(lambda: worker.stats.processed == 1, within=30)
    finally:
        await proxy.aclose()


async def test_a_store_is_not_checked_when_no_handler_uses_one(unique: str) -> None:
    app = oncely.App()

    @app.handler(unique, name="plain")
    async def plain(_: dict[str, str]) -> None: ...

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        port = await worker.serve_http(0)
        status, body = await probe(port, "/readyz")
        assert status == 200 and "store" not in body["checks"], body
