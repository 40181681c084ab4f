"""``/livez`` and ``/readyz``, each driven into its failing state for real: a blocked event
loop, a handler stuck past its timeout, a draining worker; and the ``metrics`` extra's absence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import oncely
from oncely.brokers.sqlite import SqliteBroker
from tests._wait import eventually
from tests.runtime._probe import probe, scrape, until, value
from tests.stores._redis_support import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(60)
async def test_a_blocked_event_loop_fails_livez_then_it_recovers(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = oncely.App()

    @app.handler(unique, name="blocker")
    async def blocker(msg: dict[str, float]) -> None:
        time.sleep(msg["seconds"])  # noqa: ASYNC251  (the bug under test: a blocked loop)

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    monitor = worker.observer.loop
    # A long hold, so a loaded machine's slow probe still sees the stall; cut short below.
    # The threshold is far above the lag a loaded machine gives an idle loop (the first probe
    # must pass) and far below the block.
    monitor.threshold, monitor.interval, monitor.hold = 1.0, 0.05, 60.0
    caplog.set_level(logging.WARNING, "oncely.health")
    async with worker:
        port = await worker.serve_http(0)
        status, body = await probe(port, "/livez")
        assert status == 200 and body["live"] is True, body
        await app.publish(unique, {"seconds": 3.0})
        await eventually(lambda: worker.stats.processed == 1)
        status, body = await probe(port, "/livez")
        assert status == 503, body
        assert "event loop" in body["reason"] and "blocked" in body["reason"], body
        assert worker.snapshot()["health"]["checks"]["loop"]["ok"] is False
        # The monitor thread logged where the loop was stuck while it was stuck.
        stuck = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
        assert stuck and "test_health.py" in stuck[0] and "time.sleep" in stuck[0], stuck
        # Readiness is another question: the worker can still take work.
        assert (await probe(port, "/readyz"))[0] == 200
        monitor.hold = 0.5  # read when checked: the stall now ended long enough ago
        await until(port, "/livez", 200)
    assert not any(t.name == "oncely-loop-monitor" for t in _threads())


async def test_a_handler_stuck_past_its_timeout_fails_livez(unique: str) -> None:
    app = oncely.App()
    release = asyncio.Event()

    @app.handler(unique, name="stuck", concurrency=1, timeout=0.2)
    async def stuck(_: dict[str, int]) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # the bug under test: the timeout's cancellation is swallowed

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    worker.observer.stall_timeout = 0.3
    # Not about the loop monitor: a stall of the test process over 1 s (a loaded CI
    # machine) would fail /livez for 10 s and this probe with it.
    worker.observer.loop.threshold = 5.0
    async with worker:
        port = await worker.serve_http(0)
        assert (await probe(port, "/livez"))[0] == 200
        await app.publish(unique, {"n": 1})
        await eventually(lambda: worker.in_flight == 1)
        _, body = await until(port, "/livez", 503)
        assert "stuck: all 1 slots busy and nothing settled" in body["reason"], body
        release.set()
        await eventually(lambda: worker.stats.acked == 1)
        await until(port, "/livez", 200)


async def test_a_full_pool_after_a_quiet_spell_is_not_a_stall(unique: str) -> None:
    """Stall time counts from when the pool filled, not from the last settle: a worker idle
    for longer than timeout + stall_timeout is healthy the moment work arrives."""
    app = oncely.App()
    gate = asyncio.Event()
    started = asyncio.Event()

    @app.handler(unique, name="burst", concurrency=1, timeout=0.5)
    async def burst(_: dict[str, int]) -> None:
        started.set()
        await gate.wait()

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    worker.observer.stall_timeout = 0.3
    # Not about the loop monitor: a stall of the test process over 1 s (a loaded CI
    # machine) would fail /livez for 10 s and this probe with it.
    worker.observer.loop.threshold = 5.0
    async with worker:
        port = await worker.serve_http(0)
        assert (await probe(port, "/livez"))[0] == 200  # progress is tracked from here
        await asyncio.sleep(1.2)  # the quiet spell under test, longer than 0.5 + 0.3
        await app.publish(unique, {"n": 1})
        await asyncio.wait_for(started.wait(), 10)
        status, body = await probe(port, "/livez")
        gate.set()
        assert status == 200, body
        await eventually(lambda: worker.stats.acked == 1)


async def test_waiting_messages_nobody_fetches_fail_livez(tmp_path: Path, unique: str) -> None:
    """A broker that reports a backlog while the consume loop gets nothing (here the SQLite
    queue's poller is stalled by a poll interval far longer than the stall timeout)."""
    app = oncely.App()

    @app.handler(unique, name="idle")
    async def idle(_: dict[str, int]) -> None: ...

    path = tmp_path / "q.db"
    url = f"sqlite:///{path}?poll_interval=30&max_poll_interval=30"
    worker = oncely.Worker(app, broker=url)
    worker.observer.stall_timeout, worker.observer.interval = 0.3, 0.05
    async with worker:
        port = await worker.serve_http(0)
        assert (await probe(port, "/livez"))[0] == 200
        # Publish only once the poller sleeps (its first look done): a publish landing before
        # that look is found by it, and the message is simply consumed (a loaded machine).
        broker = worker.broker
        assert isinstance(broker, SqliteBroker)
        await eventually(lambda: bool(broker._waiters.get(unique)))
        # Another process's publish does not wake this worker's poller.
        async with SqliteBroker(str(path)) as other:
            await other.publish(unique, b'{"n": 1}')
        _, body = await until(port, "/livez", 503)
        assert f"1 message(s) waiting in {unique!r} and nothing received" in body["reason"]
        assert worker.observer.backlog[unique] == {"": 1}


async def test_a_draining_worker_fails_readyz_and_stays_live(unique: str) -> None:
    app = oncely.App()
    release = asyncio.Event()
    started = asyncio.Event()

    @app.handler(unique, name="slow")
    async def slow(_: dict[str, int]) -> None:
        started.set()
        await release.wait()

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    async with worker:
        port = await worker.serve_http(0)
        status, body = await probe(port, "/readyz")
        assert status == 200 and body["checks"]["broker"]["detail"] == "connected", body
        await app.publish(unique, {"n": 1})
        await asyncio.wait_for(started.wait(), 10)
        stopping = asyncio.ensure_future(worker.stop(grace=30))
        await eventually(lambda: worker.state == "draining")
        status, body = await probe(port, "/readyz")
        assert status == 503 and body["reason"] == "state: draining", body
        assert (await probe(port, "/livez"))[0] == 200
        snap = worker.snapshot()["health"]
        assert snap["ready"] is False and snap["live"] is True
        release.set()
        await stopping
    assert worker.stats.acked == 1


async def test_health_and_metrics_answer_through_the_asgi_app(unique: str) -> None:
    app = oncely.App()

    @app.handler(unique, name="h")
    async def h(_: dict[str, int]) -> None: ...

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.request"}

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        for path in ("/readyz", "/livez", "/metrics"):
            scope = {"type": "http", "method": "GET", "path": path, "query_string": b""}
            await worker.endpoints.asgi(scope, receive, send)  # type: ignore[arg-type]
            assert sent[-2]["status"] == 200, (path, sent[-1])
        assert b"oncely_worker_ready 1.0" in sent[-1]["body"]  # type: ignore[operator]
        # The first probe started the monitor; stop() ends it.
        assert worker.observer.running
    assert not worker.observer.running


async def test_oncely_run_metrics_port_serves_probes_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    env["CLI_APPS_STARTED"] = str(tmp_path / "started")
    db = tmp_path / "jobs.db"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220  (started once, never waited on here)
            [
                *(sys.executable, "-m", "oncely", "run", "tests.runtime.cli_apps:app"),
                *("--broker", f"sqlite:///{db}", "--metrics-port", str(port)),
                *("--metrics-host", "127.0.0.1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = await probe(port, "/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        assert body["checks"]["store"]["ok"] is True, body  # an effectively-once handler
        samples = await scrape(port)
        labels = {"handler": "tests.runtime.cli_apps.slow", "topic": "slow", "broker": "sqlite"}
        assert value(samples, "oncely_messages_received_total", **labels) == 0
        assert value(samples, "oncely_worker_ready") == 1
        assert value(samples, "oncely_queue_depth", topic="slow") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    assert f"serving /metrics, /livez, /readyz on 127.0.0.1:{port}" in log.read_text()


HIDE_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None  # as if not installed\n"


def test_without_the_extra_nothing_is_imported_and_metrics_port_says_what_to_install() -> None:
    script = HIDE_PROMETHEUS + (
        "import asyncio, oncely\n"
        "from oncely.errors import MissingExtra\n"
        "app = oncely.App()\n"
        "@app.handler('t')\n"
        "async def h(_: dict) -> None: ...\n"
        "async def main() -> None:\n"
        "    async with oncely.Worker(app, broker='memory://x') as worker:\n"
        "        assert '/metrics' not in worker.endpoints.paths, worker.endpoints.paths\n"
        "        port = await worker.serve_http(0)  # health without metrics\n"
        "        try:\n"
        "            await worker.serve_http(0, metrics=True)\n"
        "        except MissingExtra as exc:\n"
        "            print('MISSING:', exc)\n"
        "asyncio.run(main())\n"
        "print('IMPORTED:', [m for m in sys.modules if m.startswith('prometheus')])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "MISSING: the /metrics endpoint needs the 'prometheus_client' package" in out.stdout
    assert "pip install 'oncely[metrics]'" in out.stdout
    assert "IMPORTED: ['prometheus_client']" in out.stdout  # only the None placeholder
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            HIDE_PROMETHEUS + "from oncely.runtime.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))",
            "run",
            "tests.runtime.cli_apps:app",
            "--broker",
            "memory://x",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "pip install 'oncely[metrics]'" in run.stderr, run.stderr


def _threads() -> list[threading.Thread]:
    return list(threading.enumerate())


CONTRACT = """
oncely_messages_received_total oncely_messages_acked_total oncely_messages_nacked_total
oncely_messages_rejected_total oncely_messages_retried_total oncely_dead_letters_total
oncely_duplicates_total oncely_in_progress_collisions_total oncely_deferred_total
oncely_fail_open_total oncely_completion_record_failures_total oncely_store_errors_total
oncely_visibility_extensions_total oncely_visibility_extension_failures_total
oncely_settle_errors_total oncely_internal_errors_total oncely_consume_errors_total
oncely_handler_duration_seconds_count oncely_store_latency_seconds_count oncely_in_flight
oncely_broker_connected oncely_worker_ready oncely_queue_depth""".split()
"""Series that dashboards, alerts and the runbook use: renaming one breaks them."""


async def test_every_contract_series_is_served(unique: str) -> None:
    app = oncely.App()

    @app.handler(unique, name="h", idempotent=True, key="payload:id")
    async def h(_: dict[str, str]) -> None: ...

    worker = oncely.Worker(app, broker=f"memory://{unique}", store=f"memory://{unique}")
    worker.observer.interval = 0.05
    async with worker:
        port = await worker.serve_http(0)
        await app.publish(unique, {"id": unique})
        await eventually(lambda: worker.stats.acked == 1 and unique in worker.observer.backlog)
        names = {name for name, _ in await scrape(port)}
    assert sorted(set(CONTRACT) - names) == []


async def test_failing_consume_loops_fail_readyz_where_the_adapter_cannot_tell(
    unique: str,
) -> None:
    """An adapter with no ``connected`` (``None``: SQS, third-party ones) whose fetches fail
    with ``ConnectionLost``: readiness follows the consume loop's errors."""
    from oncely.brokers.memory import MemoryBroker
    from oncely.errors import ConnectionLost
    from tests.runtime._faulty import WrappedBroker

    down = False

    def fetch() -> None:
        if down:
            raise ConnectionLost("the test cut the broker")

    app = oncely.App()

    @app.handler(unique, name="h")
    async def h(_: dict[str, int]) -> None: ...

    broker = WrappedBroker(MemoryBroker(unique), on_next=fetch)
    async with broker, oncely.Worker(app, broker=broker) as worker:
        assert broker.connected is None
        port = await worker.serve_http(0)
        status, body = await probe(port, "/readyz")
        assert status == 200 and body["checks"]["broker"]["detail"] == "no consume errors", body
        down = True
        await app.publish(unique, {"n": 1})  # wakes the loop into the failing fetch
        _, body = await until(port, "/readyz", 503)
        assert body["reason"].startswith("broker: consuming failed"), body
        down = False
        await app.publish(unique, {"n": 2})
        await eventually(lambda: worker.stats.acked == 2, within=30)
        await until(port, "/readyz", 200)


async def test_a_failed_start_stops_the_sampler_and_the_loop_monitor(unique: str) -> None:
    """Endpoints served before ``start()`` start the observer; a start that fails must not
    leave its sampler task and monitor thread running for a worker that never ran."""
    app = oncely.App()

    @app.handler(unique, name="h")
    async def h(_: dict[str, int]) -> None: ...

    @app.on_startup
    async def boom() -> None:
        raise RuntimeError("startup failed")

    worker = oncely.Worker(app, broker=f"memory://{unique}")
    await worker.serve_http(0)
    assert worker.observer.running
    with pytest.raises(RuntimeError, match="startup failed"):
        await worker.start()
    assert not worker.observer.running
    assert not worker.observer.loop.running
    assert not any(t.name == "oncely-loop-monitor" for t in _threads())


async def test_a_backlog_that_never_could_be_read_is_logged(
    unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sampler logged a failing backlog only after a good sample: a broker (or outbox)
    whose backlog failed from the first call on failed silently forever."""
    from oncely.brokers.memory import MemoryBroker
    from oncely.errors import BrokerError

    class Refusing(MemoryBroker):
        async def backlog(self, topic: str) -> dict[str, int] | None:
            raise BrokerError(f"no access to the depth of {topic}")

    class NoOutbox:
        table = f"outbox_{unique}"

        async def backlog(self) -> tuple[int, float | None]:
            raise BrokerError("the outbox table is gone")

    app = oncely.App()

    @app.handler(unique, name="h")
    async def h(_: dict[str, int]) -> None: ...

    caplog.set_level(logging.WARNING, "oncely.health")
    worker = oncely.Worker(app, broker=Refusing(unique))
    worker.observer.interval = 0.05
    worker.watch_outbox(NoOutbox())  # type: ignore[arg-type]
    async with worker:
        await worker.serve_http(0)
        samples = worker.observer.samples
        await eventually(lambda: worker.observer.samples >= samples + 3)

    def logged(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    assert logged(f"cannot read the backlog of {unique}: BrokerError: no access") != []
    assert len(logged(f"cannot read the backlog of {unique}")) == 1  # not once a pass
    assert len(logged(f"cannot read the backlog of outbox outbox_{unique}")) == 1
