"""``Broker.backlog`` and ``Broker.connected`` on the brokers not covered elsewhere: SQS on
ElasticMQ, Kafka (lag per partition, scraped as ``oncely_consumer_lag``), SQLite and memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import oncely
from oncely.brokers import _sqs_queues
from oncely.brokers.memory import MemoryBroker
from oncely.brokers.sqlite import SqliteBroker
from oncely.brokers.sqs import SqsBroker
from oncely.errors import BrokerError
from tests._wait import eventually
from tests.brokers.kafka_support import kafka_url
from tests.brokers.test_sqs import ENDPOINT, SQS_URL
from tests.runtime._probe import probe, scrape, until, value

pytestmark = pytest.mark.anyio


async def test_embedded_brokers_count_claimable_messages(tmp_path: Path, unique: str) -> None:
    for broker in (MemoryBroker(unique), SqliteBroker(str(tmp_path / "q.db"))):
        assert broker.connected is False
        async with broker:
            assert broker.connected is True
            assert await broker.backlog(unique) == {"": 0}
            await broker.publish(unique, b"1")
            await broker.publish(unique, b"2")
            await broker.publish(unique, b"later", delay=60)  # not claimable yet
            assert await broker.backlog(unique) == {"": 2}
            async with broker.consume(unique, prefetch=1, visibility=30) as sub:
                delivery = await sub.__anext__()
                assert await broker.backlog(unique) == {"": 1}  # the claimed one is held
                await delivery.ack()
        assert broker.connected is False


@pytest.mark.sqs
async def test_sqs_reports_approximate_depth(unique: str) -> None:
    async with SqsBroker.from_url(SQS_URL) as broker:
        assert broker.connected is None  # stateless HTTP: it cannot tell
        with pytest.raises(BrokerError, match=r"QueueDoesNotExist|NonExistentQueue"):
            await broker.backlog(unique)  # a look-up never creates the queue (or its DLQ)
        with pytest.raises(BrokerError, match=r"QueueDoesNotExist|NonExistentQueue"):
            await _sqs_queues.lookup(broker, unique)
        for n in range(3):
            await broker.publish(unique, b"%d" % n)
        assert await broker.backlog(unique) == {"": 3}


@pytest.mark.kafka
async def test_kafka_lag_per_partition_is_scraped(unique: str) -> None:
    app = oncely.App()
    gate = asyncio.Event()

    @app.handler(unique, name="lagging", concurrency=1)
    async def lagging(_: dict[str, int]) -> None:
        await gate.wait()

    url = kafka_url()
    worker = oncely.Worker(app, broker=url)
    worker.observer.interval = 0.2
    async with worker:
        port = await worker.serve_http(0)
        for n in range(5):
            await app.publish(unique, {"n": n}, key="one-partition")

        def lag() -> int | None:
            lags = worker.observer.backlog.get(unique)
            return None if not lags else sum(lags.values())

        # The first record runs (not done), so all five are after the commit point.
        await eventually(lambda: lag() == 5, within=60)
        assert worker.broker is not None and worker.broker.connected is True
        gate.set()
        await eventually(lambda: worker.stats.acked == 5, within=60)
        await eventually(lambda: lag() == 0, within=60)
        samples = await scrape(port)
        lags = worker.observer.backlog[unique]
        for partition in lags:
            assert value(samples, "oncely_consumer_lag", topic=unique, partition=partition) == 0
        assert value(samples, "oncely_broker_connected", broker="kafka") == 1


@pytest.mark.kafka
async def test_a_long_handler_behind_kafka_lag_is_busy_not_stuck(unique: str) -> None:
    """Kafka's lag counts records after the commit point, so the one still running counts as
    waiting: with room in the pool and nothing more to fetch, a handler running longer than
    ``stall_timeout`` (well within its own timeout) is a busy worker, and ``/livez`` passes."""
    app = oncely.App()
    gate = asyncio.Event()

    @app.handler(unique, name="long", concurrency=2, timeout=600)
    async def long(_: dict[str, int]) -> None:
        await gate.wait()

    worker = oncely.Worker(app, broker=kafka_url())
    worker.observer.interval, worker.observer.stall_timeout = 0.05, 0.3
    # Not about the loop monitor: a stall of the test process over 1 s (a loaded CI
    # machine) would fail /livez for 10 s and this probe with it.
    worker.observer.loop.threshold = 5.0
    async with worker:
        port = await worker.serve_http(0)
        await app.publish(unique, {"n": 1})
        await eventually(lambda: worker.in_flight == 1, within=60)
        await eventually(lambda: sum(worker.observer.backlog.get(unique, {}).values()) == 1)
        seen = time.monotonic()
        # Enough sampler passes that the run has outlasted stall_timeout several times over.
        await eventually(lambda: time.monotonic() - seen > 4 * worker.observer.stall_timeout)
        status, body = await probe(port, "/livez")
        gate.set()
        assert status == 200, body
        await eventually(lambda: worker.stats.acked == 1, within=60)


class HangProxy:
    """A TCP proxy in front of a real server; ``hang()`` makes it a black hole (bytes are
    taken and dropped both ways, new connections accepted and never answered), the way an
    endpoint behind a dead route or a wedged load balancer looks, until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self.hung = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def hang(self) -> None:
        self.hung = True

    def restore(self) -> None:
        self.hung = False

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.hung:
            self._spawn(self._pipe(reader, None))
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None) -> None:
        try:
            while data := await src.read(65536):
                if dst is not None and not self.hung:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass
        finally:
            if dst is not None:
                dst.transport.abort()


@pytest.mark.sqs
@pytest.mark.timeout(180)
async def test_an_sqs_endpoint_that_stops_answering_fails_readyz(unique: str) -> None:
    """SQS cannot say it is connected (``None``) and a hung receive reports no consume error
    until botocore's read timeouts and retries run out (a minute and more): the sampler's
    backlog call, bounded by ``ping_timeout``, is the fresh sign that the broker answers."""
    parts = urlsplit(ENDPOINT)
    proxy = HangProxy(parts.hostname or "127.0.0.1", parts.port or 9324)
    await proxy.start()
    app = oncely.App()

    @app.handler(unique, name="h")
    async def h(_: dict[str, int]) -> None: ...

    url = f"sqs://?region=us-east-1&endpoint=http://127.0.0.1:{proxy.listen_port}&wait=1"
    worker = oncely.Worker(app, broker=url)
    worker.observer.interval = 0.1
    try:
        async with worker:
            port = await worker.serve_http(0)
            await app.publish(unique, {"n": 1})
            await eventually(lambda: worker.stats.acked == 1, within=60)
            await eventually(lambda: unique in worker.observer.backlog, within=30)
            status, body = await probe(port, "/readyz")
            assert status == 200, body
            proxy.hang()
            _, body = await until(port, "/readyz", 503, within=20)
            assert body["reason"].startswith("broker: cannot reach the broker"), body
            assert worker.stats.consume_errors == 0  # the consume loop alone could not tell
            proxy.restore()
            await until(port, "/readyz", 200, within=60)
    finally:
        await proxy.aclose()
