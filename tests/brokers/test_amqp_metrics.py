"""``/metrics`` and ``/readyz`` of a worker on a real RabbitMQ: counts scraped over HTTP match
what was processed, and a connection cut by a TCP fault proxy fails readiness until it heals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import oncely
from oncely.brokers.amqp import AmqpBroker
from tests._wait import eventually
from tests.brokers.test_amqp import AMQP_URL, delete_topology
from tests.runtime._probe import probe, scrape, until, value
from tests.stores._outbox_support import FaultProxy

pytestmark = [pytest.mark.amqp, pytest.mark.anyio]


@pytest.fixture
async def topic(unique: str) -> AsyncIterator[str]:
    yield unique
    await delete_topology(unique)


async def test_scraped_counts_match_what_the_worker_did(topic: str) -> None:
    app = oncely.App()

    @app.handler(
        topic,
        name="orders",
        idempotent=True,
        key="payload:id",
        retry=oncely.RetryPolicy(max_attempts=3, base=0.01, cap=0.01),
    )
    async def handle(p: dict[str, Any], ctx: oncely.Context) -> None:
        if p["id"] == "flaky" and ctx.attempt < 2:
            raise ConnectionError("downstream hiccup")
        if p["id"] == "bad":
            raise oncely.Reject("bad order")

    worker = oncely.Worker(app, broker=AMQP_URL, store=f"memory://{topic}")
    worker.observer.interval = 0.1
    async with worker:
        port = await worker.serve_http(0)
        for pid in ("a", "a", "flaky", "bad"):
            await app.publish(topic, {"id": pid})
        await app.publish(topic, b"\xff not json")
        stats = worker.stats
        await eventually(lambda: stats.acked == 3 and stats.dead_lettered == 2)
        samples = await scrape(port)
        labels = {"handler": "orders", "topic": topic, "broker": "amqp"}

        def metric(name: str) -> float | None:
            return value(samples, name, **labels)

        # a, a, flaky twice, bad, the poison payload.
        assert metric("oncely_messages_received_total") == 6
        assert metric("oncely_messages_acked_total") == 3  # a, its duplicate, flaky
        assert metric("oncely_messages_nacked_total") == 1  # flaky's first attempt
        assert metric("oncely_messages_retried_total") == 1
        assert metric("oncely_messages_rejected_total") == 1  # bad raised Reject
        assert metric("oncely_dead_letters_total") == 2  # bad, and the poison payload
        assert metric("oncely_duplicates_total") == 1
        assert metric("oncely_in_progress_collisions_total") == 0
        assert metric("oncely_store_errors_total") == 0
        assert metric("oncely_in_flight") == 0
        # Handler runs: a, flaky twice, bad; every bucket count is cumulative up to +Inf.
        assert metric("oncely_handler_duration_seconds_count") == 4
        inf = value(samples, "oncely_handler_duration_seconds_bucket", **labels, le="+Inf")
        assert inf == 4
        assert (value(samples, "oncely_handler_duration_seconds_sum", **labels) or 0) > 0
        # A begin per keyed delivery (5) and the completions (a, flaky, bad's release...).
        assert (metric("oncely_store_latency_seconds_count") or 0) >= 5
        assert value(samples, "oncely_broker_connected", broker="amqp") == 1
        assert value(samples, "oncely_worker_ready") == 1
        await eventually(lambda: topic in worker.observer.backlog)
        samples = await scrape(port)
        assert value(samples, "oncely_queue_depth", topic=topic) == 0


async def test_queue_depth_counts_ready_messages_without_declaring(topic: str) -> None:
    async with AmqpBroker(AMQP_URL) as broker:
        with pytest.raises(oncely.errors.ConnectionLost):
            await broker.backlog(topic)  # a passive declare never creates the queue
        for n in range(3):
            await broker.publish(topic, b"%d" % n)
        assert await broker.backlog(topic) == {"": 3}
        assert broker.connected is True
    assert broker.connected is False


async def test_a_cut_broker_connection_fails_readyz_until_it_is_back(topic: str) -> None:
    parts = urlsplit(AMQP_URL)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.listen_port}/?reconnect_interval=0.2"
    app = oncely.App()

    @app.handler(topic, name="jobs")
    async def jobs(_: dict[str, int]) -> None: ...

    worker = oncely.Worker(app, broker=url)
    # The consume errors of the cut keep /readyz failing for this long once the broker is
    # back (and nothing received): the default 15 s was most of this test's time.
    worker.observer.ready_window = 1.0
    try:
        async with worker:
            port = await worker.serve_http(0)
            status, body = await probe(port, "/readyz")
            assert status == 200 and body["checks"]["broker"]["detail"] == "connected", body
            proxy.cut()
            status, body = await until(port, "/readyz", 503)
            assert "broker: disconnected" in body["reason"], body
            samples = await scrape(port)
            assert value(samples, "oncely_broker_connected", broker="amqp") == 0
            assert value(samples, "oncely_worker_ready") == 0
            assert (await probe(port, "/livez"))[0] == 200  # disconnected is not dead
            proxy.restore()
            await until(port, "/readyz", 200, within=30)
            await app.publish(topic, {"n": 1})
            await eventually(lambda: worker.stats.acked == 1, within=30)
    finally:
        await proxy.aclose()
