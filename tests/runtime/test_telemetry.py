"""Per-handler counters and timings, the worker's snapshot, and the HTTP endpoints serving it."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

import oncely
from oncely.runtime import _keys, http
from oncely.runtime._status import redact_url
from oncely.runtime.http import Endpoints, Response
from oncely.runtime.stats import Histogram, Stats
from oncely.stores.memory import MemoryStore
from tests._wait import eventually


def test_histogram_uses_prometheus_buckets_and_estimates_quantiles() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 0.5, 2.0):
        h.observe(value)
    # 0.1 lands in the 0.1 bucket (upper bounds are inclusive), 2.0 in +Inf.
    assert h.counts == [1, 2, 1]
    assert (h.count, h.sum) == (4, 3.1)
    assert h.quantile(0.5) == pytest.approx(0.55)  # rank 2: halfway through (0.1, 1.0]
    assert h.quantile(1.0) == 1.0  # +Inf answers the largest finite bound
    assert Histogram().quantile(0.5) is None
    snap = h.snapshot()
    assert snap["counts"] == [1, 2, 1] and snap["p50"] == pytest.approx(0.55)


def test_stats_as_dict_holds_counters_only() -> None:
    stats = Stats(processed=2)
    stats.enable_timings()
    assert stats.as_dict()["processed"] == 2
    assert "handler_seconds" not in stats.as_dict()


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"
    assert redact_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"


@pytest.mark.anyio
async def test_counters_are_kept_per_handler_and_summed_live(unique: str) -> None:
    app = oncely.App()
    failed_once: set[int] = set()

    @app.handler("ok", name="ok")
    async def ok(_: dict[str, int]) -> None: ...

    @app.handler("flaky", name="flaky", retry=oncely.RetryPolicy(base=0.01, cap=0.01))
    async def flaky(msg: dict[str, int]) -> None:
        if msg["n"] not in failed_once:
            failed_once.add(msg["n"])
            raise RuntimeError("first try fails")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        totals = worker.stats  # a live view: read later, it has moved on
        for n in range(3):
            await app.publish("ok", {"n": n})
        await app.publish("flaky", {"n": 1})
        await eventually(lambda: totals.processed == 4)
        ok_stats, flaky_stats = worker.handler_stats["ok"], worker.handler_stats["flaky"]
        assert (ok_stats.received, ok_stats.processed, ok_stats.acked) == (3, 3, 3)
        assert (ok_stats.retried, ok_stats.nacked) == (0, 0)
        assert (flaky_stats.received, flaky_stats.retried, flaky_stats.nacked) == (2, 1, 1)
        assert (flaky_stats.processed, flaky_stats.acked) == (1, 1)
        assert totals.received == 5 and totals.as_dict()["acked"] == 4
        # Timings are off until asked for: no clock reads on the hot path.
        assert ok_stats.handler_seconds is None


@pytest.mark.anyio
async def test_collisions_duplicates_and_store_timings_are_counted(
    unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The duplicate defers once its in-process wait for the holder gives up: after 5 s by
    # default, which was nearly all of this test.
    monkeypatch.setattr(_keys, "LOCAL_WAIT_CAP", 0.2)
    app = oncely.App()
    gate = asyncio.Event()
    started = asyncio.Event()

    @app.handler("jobs", name="jobs", idempotent=True, key="payload:id", concurrency=4)
    async def handle(_: dict[str, str]) -> None:
        started.set()
        await gate.wait()

    async with oncely.Worker(app, broker=f"memory://{unique}", store=MemoryStore()) as worker:
        worker.enable_timings()
        stats = worker.handler_stats["jobs"]
        await app.publish("jobs", {"id": "a"})
        await asyncio.wait_for(started.wait(), 10)
        await app.publish("jobs", {"id": "a"})  # runs into the held key
        await eventually(lambda: stats.in_progress >= 1)
        gate.set()
        await eventually(lambda: stats.processed == 1 and stats.duplicates == 1)
        await app.publish("jobs", {"id": "a"})  # a plain duplicate now
        await eventually(lambda: stats.duplicates == 2)
        assert stats.deferred >= stats.in_progress >= 1
        assert stats.handler_seconds is not None and stats.handler_seconds.count == 1
        assert stats.store_seconds is not None
        # A begin per delivery (at least 3), and the one complete.
        assert stats.store_seconds.count >= 4
        assert stats.store_errors == 0


async def _get(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.anyio
async def test_status_json_is_served_over_http_until_the_worker_stops(unique: str) -> None:
    app = oncely.App()

    @app.handler("jobs", name="jobs")
    async def handle(_: dict[str, int]) -> None: ...

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    async with worker:
        port = await worker.serve_http(0)
        await app.publish("jobs", {"n": 1})
        await eventually(lambda: worker.stats.processed == 1)
        status, headers, body = await _get(port, b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and headers["Content-Type"] == "application/json"
        snap = json.loads(body)
        assert snap["state"] == "running" and snap["broker"] == f"memory://{unique}"
        (handler,) = snap["handlers"]
        assert handler["name"] == "jobs" and handler["counters"]["processed"] == 1
        assert handler["handler_seconds"]["count"] == 1  # serving turned timings on
        assert (await _get(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _get(port, b"POST /status.json HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _get(port, b"garbage\r\n\r\n"))[0] == 400
        status, headers, body = await _get(port, b"HEAD /status.json HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert worker.state == "stopped"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.anyio
async def test_a_failing_route_answers_500_and_the_server_goes_on() -> None:
    endpoints = Endpoints()

    async def broken(_: Any) -> Response:
        raise RuntimeError("bug")

    async def fine(query: Any) -> Response:
        return Response(200, f"hi {query.get('who')}".encode())

    endpoints.add("/broken", broken)
    endpoints.add("/fine", fine)
    server = await endpoints.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await _get(port, b"GET /broken HTTP/1.1\r\n\r\n"))[0] == 500
        status, _, body = await _get(port, b"GET /fine?who=you HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"hi you")
        # An oversized head gets an answer too, and the server goes on.
        huge = b"GET /fine HTTP/1.1\r\nX-Big: " + b"a" * (http.MAX_HEAD + 1) + b"\r\n\r\n"
        assert (await _get(port, huge))[0] == 431
        assert (await _get(port, b"GET /fine HTTP/1.1\r\n\r\n"))[0] == 200
    finally:
        await endpoints.aclose()


@pytest.mark.anyio
async def test_endpoints_work_as_an_asgi_app() -> None:
    endpoints = Endpoints()

    async def fine(query: Any) -> Response:
        return Response(200, b"ok", headers={"X-Test": "1"})

    endpoints.add("/fine", fine)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request"}

    scope = {"type": "http", "method": "GET", "path": "/fine", "query_string": b""}
    await endpoints.asgi(scope, receive, send)
    assert sent[0]["status"] == 200 and (b"x-test", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == b"ok"
    sent.clear()
    await endpoints.asgi({**scope, "path": "/missing"}, receive, send)
    assert sent[0]["status"] == 404
    # Mounted under a prefix: ASGI servers and Starlette's Mount (0.33+) pass the full path
    # and the mount point as root_path; the routes are matched below it.
    for path, status in (("/ops/fine", 200), ("/fine", 200), ("/opsfine", 404)):
        sent.clear()
        await endpoints.asgi({**scope, "path": path, "root_path": "/ops"}, receive, send)
        assert sent[0]["status"] == status, path
    sent.clear()
    await endpoints.asgi({**scope, "method": "HEAD"}, receive, send)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b""


@pytest.mark.anyio
async def test_aclose_ends_open_connections_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that connected and sent nothing (a browser's preconnect, a slowloris), and one
    whose route is still running, are cut when the server closes: no request is served after
    ``aclose()``, and (Python 3.12+, whose ``wait_closed`` waits for connections) a worker's
    ``stop()`` does not hang on them."""
    monkeypatch.setattr(http, "READ_TIMEOUT", 3600.0)
    endpoints = Endpoints()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(_: Any) -> Response:
        entered.set()
        await release.wait()
        return Response(200, b"late")

    endpoints.add("/slow", slow)
    server = await endpoints.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 10)
    try:
        await asyncio.wait_for(endpoints.aclose(), 30)
        # Both connections were closed by the server: each reads end-of-stream at once.
        assert await asyncio.wait_for(idle_reader.read(), 30) == b""
        assert await asyncio.wait_for(busy_reader.read(), 30) == b""
        # Quietly: asyncio logs a connection task that ends cancelled as an error.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        release.set()
        idle_writer.close()
        busy_writer.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A password in the query string (libpq and asyncpg read ?password=).
        (
            "postgresql://oncely@db:5432/oncely?password=hunter2&sslmode=require",
            "postgresql://oncely@db:5432/oncely?password=***&sslmode=require",
        ),
        ("postgresql://u:pw@db/x?sslpassword=k", "postgresql://u:***@db/x?sslpassword=***"),
        (
            "sqs://jobs?region=eu&aws_secret_access_key=AKIA",
            "sqs://jobs?region=eu&aws_secret_access_key=***",
        ),
        ("redis://h/0?token=abc&auth=x", "redis://h/0?token=***&auth=***"),
        # A user name alone is not a secret.
        ("amqp://guest@host/", "amqp://guest@host/"),
        # An empty password is not shown either way.
        ("redis://:@h/0", "redis://:***@h/0"),
        # A password with an unescaped '#', '?' or '/' ends the host part early: whatever
        # follows is not shown.
        ("redis://:pa#ss@h/0", "redis://***"),
        ("amqp://u:p?w@h:5672/", "amqp://***"),
        ("postgresql://u:a/b@h/db", "postgresql://***"),
    ],
)
def test_redact_url_hides_secrets_wherever_they_are(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


@pytest.mark.anyio
async def test_a_worker_whose_start_failed_is_not_shown_running(unique: str) -> None:
    """Endpoints served (or mounted) before ``start()``: a start that fails closes them, and the
    state says the worker is not running rather than ``running`` for good."""
    app = oncely.App()

    @app.handler("jobs", name="jobs")
    async def handle(_: dict[str, int]) -> None: ...

    @app.on_startup
    async def broken() -> None:
        raise RuntimeError("cannot warm the cache")

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    port = await worker.serve_http(0)
    with pytest.raises(RuntimeError, match="warm"):
        await worker.start()
    assert worker.state == "stopped"
    assert worker.snapshot()["state"] == "stopped"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
