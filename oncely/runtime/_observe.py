"""Health probes and the samples metrics read: ``/livez``, ``/readyz``, backlog, store pings.

Nothing here runs until something asks for it (``Worker.serve_http``, or the first probe or
scrape through ``Worker.endpoints``): a worker nobody watches pays nothing.

**Live** (``/livez``; failing means "restart me"):

- ``loop``: the event loop was not blocked past ``block_threshold`` recently (see
  ``_loopmon``);
- ``progress``: no handler has every slot busy with nothing settled for longer than its
  timeout plus ``stall_timeout`` (handler timeouts cancel runs, so a full pool that settles
  nothing is stuck: a handler swallowing its cancellation, a settle that hangs), and none is
  idle (nothing in flight) while its broker reports messages waiting and nothing was received
  for ``stall_timeout``. Only idle counts: a run in flight can rightly hold back what the
  broker counts as waiting (Kafka's lag includes the records still running, and records
  queued behind a running key), and a handler may run far longer than ``stall_timeout``.

**Ready** (``/readyz``; failing means "send no work / do not count me"):

- ``state``: the worker is running (not created, draining or stopped);
- ``broker``: the adapter does not report its connection down (``Broker.connected``) and the
  consume loops are not failing (consume errors in the last ``ready_window`` seconds with
  nothing received since); where the adapter cannot tell (``connected`` is ``None``: SQS),
  also the last backlog sample did not time out or lose the connection (a hung endpoint
  fails no consume call until the driver's own timeouts and retries run out);
- ``store``: for workers with effectively-once handlers, the last ``IdempotencyStore.ping``
  (every ``interval`` seconds, with a ``ping_timeout``) succeeded.

A sampler task, supervised (a failed sample is logged and the next one runs; a task that dies
anyway is logged and restarted), does the I/O every ``interval`` seconds: broker backlog per
topic, the store ping, and the watched outboxes' backlog. Probes and scrapes read its last
results and never do I/O themselves.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from oncely.errors import ConnectionLost, MissingExtra, NotSupported
from oncely.runtime._loopmon import LoopMonitor
from oncely.runtime._watch import OutboxSample
from oncely.runtime.http import Response

if TYPE_CHECKING:
    from collections.abc import Mapping

    from oncely.brokers.base import Broker
    from oncely.runtime._watch import Watched
    from oncely.runtime.http import Route
    from oncely.stores.base import IdempotencyStore
    from oncely.stores.outbox import Outbox

log = logging.getLogger("oncely.health")

RESTART_DELAY = 1.0
"""Seconds before a sampler task that died is started again."""


@dataclass(slots=True)
class _Progress:
    settled: int = -1
    settled_at: float = 0.0
    received: int = -1
    received_at: float = 0.0
    busy_since: float | None = None
    """Since when (as far as ``track`` saw) every slot has been busy."""


class Observer:
    """Health checks and samples of one worker. Tunable attributes may be set before
    ``start()``: ``interval``, ``stall_timeout``, ``ready_window``, ``ping_timeout``, and the
    loop monitor's ``threshold`` and ``hold`` (``observer.loop``)."""

    def __init__(
        self, worker: Watched, *, block_threshold: float = 1.0, stall_timeout: float = 60.0
    ) -> None:
        self.worker = worker
        self.loop = LoopMonitor(threshold=block_threshold)
        self.interval = 5.0
        self.stall_timeout = stall_timeout
        self.ready_window = 15.0
        self.ping_timeout = 2.0
        self.backlog: dict[str, dict[str, int]] = {}
        """Last sampled ``Broker.backlog`` per topic (absent: unknown)."""
        self.store_ok: tuple[bool, str] | None = None
        self.outboxes: dict[str, Outbox] = {}
        self.outbox_samples: dict[str, OutboxSample] = {}
        self.samples = 0
        """Completed sampler passes."""
        self._progress: dict[str, _Progress] = {}
        self._waiting_since: dict[str, float] = {}
        """Per topic: since when the sampled backlog has been non-zero."""
        self._outbox_failed: set[str] = set()
        self._backlog_failed: dict[str, Exception] = {}
        """Per topic: why the last backlog sample failed (absent: it did not)."""
        self._errors = _Progress()
        self._no_backlog = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._metrics: Route | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the loop monitor and the sampler (on the running loop). Idempotent."""
        if self._task is not None or self._closed:
            return
        self.loop.start()
        self._spawn()

    def _spawn(self) -> None:
        self._task = asyncio.create_task(self._run(), name="oncely:health-sampler")
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if self._closed or task.cancelled():
            return
        log.error("the health sampler died; restarting it", exc_info=task.exception())
        asyncio.get_running_loop().call_later(RESTART_DELAY, self._respawn)

    def _respawn(self) -> None:
        if not self._closed:
            self._spawn()

    async def aclose(self) -> None:
        self._closed = True
        self.loop.stop()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def watch_outbox(self, outbox: Outbox) -> None:
        self.outboxes[outbox.table] = outbox

    async def _run(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                await self.sample()
            except Exception:
                log.exception("a health sample failed; the next one runs in %gs", self.interval)
            if task is not None and task.cancelling():
                # A driver that turned our cancel into its own error must not keep us alive.
                raise asyncio.CancelledError
            await asyncio.sleep(self.interval)

    async def sample(self) -> None:
        """One pass: backlog per topic, the store ping, the outboxes."""
        worker = self.worker
        broker = worker.broker
        if broker is not None and not self._no_backlog:
            for topic in dict.fromkeys(spec.topic for spec in worker.specs):
                await self._sample_backlog(broker, topic)
        if any(spec.uses_store for spec in worker.specs):
            self.store_ok = await self._ping(worker.store)
        for table, outbox in list(self.outboxes.items()):
            await self._sample_outbox(table, outbox)
        self.track()
        self.samples += 1

    async def _sample_backlog(self, broker: Broker, topic: str) -> None:
        try:
            async with asyncio.timeout(self.ping_timeout):
                value = await broker.backlog(topic)
        except NotSupported:
            self._no_backlog = True
            return
        except Exception as exc:
            self._waiting_since.pop(topic, None)
            self.backlog.pop(topic, None)
            if topic not in self._backlog_failed:  # once per failing spell, the first included
                log.warning("cannot read the backlog of %s: %s", topic, _describe(exc))
            self._backlog_failed[topic] = exc
            return
        self._backlog_failed.pop(topic, None)
        if value is None:  # cannot tell now (a Kafka consumer before its first fetch, say)
            self.backlog.pop(topic, None)
            self._waiting_since.pop(topic, None)
            return
        self.backlog[topic] = value
        if sum(value.values()) > 0:
            self._waiting_since.setdefault(topic, time.monotonic())
        else:
            self._waiting_since.pop(topic, None)

    async def _ping(self, store: IdempotencyStore | None) -> tuple[bool, str]:
        if store is None:
            return False, "not connected"
        try:
            started = time.monotonic()
            async with asyncio.timeout(self.ping_timeout):
                await store.ping()
        except TimeoutError:
            return False, f"ping timed out after {self.ping_timeout:g}s"
        except Exception as exc:
            return False, f"ping failed: {type(exc).__name__}: {exc}"
        return True, f"ping {1000 * (time.monotonic() - started):.1f}ms"

    async def _sample_outbox(self, table: str, outbox: Outbox) -> None:
        try:
            async with asyncio.timeout(self.ping_timeout):
                count, oldest = await outbox.backlog()
        except Exception as exc:
            self.outbox_samples.pop(table, None)
            if table not in self._outbox_failed:  # once per failing spell, the first included
                log.warning("cannot read the backlog of outbox %s: %s", table, _describe(exc))
                self._outbox_failed.add(table)
            return
        self._outbox_failed.discard(table)
        age = None if oldest is None else max(0.0, time.time() - oldest)
        self.outbox_samples[table] = OutboxSample(count, age)

    def track(self) -> None:
        """Note which counters moved since the last call (progress is measured from it)."""
        now = time.monotonic()
        load = self.worker.load
        for name, stats in self.worker.handler_stats.items():
            p = self._progress.setdefault(name, _Progress(settled_at=now, received_at=now))
            in_flight, size = load.get(name, (0, 1))
            if in_flight < size:
                p.busy_since = None
            elif p.busy_since is None:
                p.busy_since = now
            settled = stats.acked + stats.nacked + stats.dead_lettered + stats.settle_errors
            if settled != p.settled:
                p.settled, p.settled_at = settled, now
            if stats.received != p.received:
                p.received, p.received_at = stats.received, now
        e = self._errors
        errors = sum(s.consume_errors for s in self.worker.handler_stats.values())
        if errors != e.settled:
            e.settled, e.settled_at = errors, now if e.settled >= 0 else 0.0

    # -- checks --------------------------------------------------------------------------------

    def checks(self) -> dict[str, dict[str, Any]]:
        """Every check by name: ``{"ok": bool, "detail": str, "probe": "live" | "ready"}``."""
        self.track()
        out = {"loop": self._loop_check(), "progress": self._progress_check()}
        out["state"] = self._state_check()
        out["broker"] = self._broker_check()
        if any(spec.uses_store for spec in self.worker.specs):
            out["store"] = self._store_check()
        return out

    def health(self) -> dict[str, Any]:
        """``{"live": bool, "ready": bool, "checks": {...}}`` for ``Worker.snapshot``."""
        checks = self.checks()
        return {
            "live": all(c["ok"] for c in checks.values() if c["probe"] == "live"),
            "ready": all(c["ok"] for c in checks.values() if c["probe"] == "ready"),
            "checks": checks,
        }

    def _loop_check(self) -> dict[str, Any]:
        if not self.loop.running:
            return _check("live", True, "not monitored (serve_http or a probe starts it)")
        problem = self.loop.problem()
        if problem is not None:
            return _check("live", False, problem)
        return _check("live", True, f"largest lag {self.loop.max_lag * 1000:.0f}ms")

    def _progress_check(self) -> dict[str, Any]:
        now = time.monotonic()
        load = self.worker.load
        stuck = []
        for spec in self.worker.specs:
            p = self._progress.get(spec.name)
            in_flight, size = load.get(spec.name, (0, spec.concurrency))
            if p is None or size <= 0:
                continue
            if in_flight >= size and p.busy_since is not None:
                idle = now - max(p.busy_since, p.settled_at)
                if idle > spec.timeout + self.stall_timeout:
                    stuck.append(
                        f"{spec.name}: all {size} slots busy and nothing settled for {idle:.1f}s"
                    )
                    continue
            waiting = sum(self.backlog.get(spec.topic, {}).values())
            since = self._waiting_since.get(spec.topic)
            quiet = 0.0 if since is None else now - max(since, p.received_at, p.settled_at)
            if waiting and in_flight == 0 and quiet > self.stall_timeout:
                stuck.append(
                    f"{spec.name}: {waiting} message(s) waiting in {spec.topic!r} and "
                    f"nothing received for {quiet:.1f}s"
                )
        if stuck:
            return _check("live", False, "; ".join(stuck))
        return _check("live", True, "consuming")

    def _state_check(self) -> dict[str, Any]:
        state = self.worker.state
        return _check("ready", state == "running", state)

    def _broker_check(self) -> dict[str, Any]:
        broker = self.worker.broker
        if broker is None:
            return _check("ready", False, "not connected")
        try:
            connected = broker.connected
        except Exception as exc:  # a third-party adapter's bug must not break the probe
            connected = None
            log.warning("%s.connected raised %r", type(broker).__name__, exc)
        if connected is False:
            return _check("ready", False, "disconnected")
        if connected is None:
            for topic, failure in self._backlog_failed.items():
                if isinstance(failure, (ConnectionLost, TimeoutError)):
                    why = _describe(failure)
                    return _check(
                        "ready", False, f"cannot reach the broker: the backlog of {topic!r}: {why}"
                    )
        e = self._errors
        received_at = max((p.received_at for p in self._progress.values()), default=0.0)
        since = time.monotonic() - e.settled_at
        if e.settled > 0 and e.settled_at > received_at and since < self.ready_window:
            return _check(
                "ready", False, f"consuming failed {since:.1f}s ago ({e.settled} errors in all)"
            )
        return _check("ready", True, "connected" if connected else "no consume errors")

    def _store_check(self) -> dict[str, Any]:
        if self.store_ok is None:
            return _check("ready", self.worker.store is not None, "not pinged yet")
        ok, detail = self.store_ok
        return _check("ready", ok, detail)

    # -- routes --------------------------------------------------------------------------------

    async def metrics(self, query: Mapping[str, str]) -> Response:
        """``/metrics``: on first use, imports prometheus-client, turns timings on and starts
        the sampler (a worker nobody scrapes pays for none of it)."""
        if self._metrics is None:
            from oncely.runtime.metrics import metrics_route

            self.worker.enable_timings()
            self.start()
            _, self._metrics = metrics_route(self.worker, self)
        return await self._metrics(query)

    async def livez(self, query: Mapping[str, str]) -> Response:
        return self._probe("live")

    async def readyz(self, query: Mapping[str, str]) -> Response:
        return self._probe("ready")

    def _probe(self, probe: str) -> Response:
        self.start()
        checks = {k: c for k, c in self.checks().items() if c["probe"] == probe}
        ok = all(c["ok"] for c in checks.values())
        reason = "; ".join(f"{k}: {c['detail']}" for k, c in checks.items() if not c["ok"])
        body = {probe: ok, "reason": reason or None, "checks": checks}
        return Response(200 if ok else 503, msgspec.json.encode(body), "application/json")


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"  # asyncio.timeout's, around the call
    return f"{type(exc).__name__}: {exc}"


def _check(probe: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail, "probe": probe}


def metrics_installed() -> bool:
    """Whether prometheus-client is importable (found without importing it)."""
    return importlib.util.find_spec("prometheus_client") is not None


def require_metrics() -> None:
    """Raises:
    MissingExtra: prometheus-client is not installed (the message says what to install).
    """
    if not metrics_installed():
        raise MissingExtra("metrics", "metrics", "prometheus_client", what="the /metrics endpoint")
