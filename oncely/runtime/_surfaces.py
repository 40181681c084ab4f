"""The worker's observable surfaces: timings, ``snapshot()``, the HTTP endpoints' server, and
the outbox it samples for metrics. A base of ``Worker``, kept apart to keep that module small."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from oncely.runtime._observe import require_metrics
from oncely.runtime._status import snapshot
from oncely.runtime.http import Response

if TYPE_CHECKING:
    from collections.abc import Mapping

    from oncely.brokers.base import Broker
    from oncely.runtime._consume import Pool
    from oncely.runtime._observe import Observer
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.http import Endpoints
    from oncely.runtime.stats import Stats
    from oncely.stores.base import IdempotencyStore
    from oncely.stores.outbox import Outbox, OutboxRelay


class Surfaces:
    """What ``Worker`` shows of itself; the attributes below are ``Worker``'s."""

    specs: list[HandlerSpec]
    handler_stats: dict[str, Stats]
    endpoints: Endpoints
    observer: Observer
    broker: Broker | None
    failure: BaseException | None
    _broker_arg: str | Broker
    _store_arg: str | IdempotencyStore | None
    _pools: list[Pool]
    _started_at: float | None

    @property
    def state(self) -> str:
        raise NotImplementedError

    @property
    def load(self) -> dict[str, tuple[int, int]]:
        """Per handler: deliveries in flight, and how many may be (its concurrency)."""
        return {pool.runner.spec.name: (pool.in_flight, pool.size) for pool in self._pools}

    def watch_outbox(self, outbox: Outbox | OutboxRelay) -> None:
        """Sample ``outbox``'s backlog and oldest unsent row for metrics
        (``oncely_outbox_backlog``, ``oncely_outbox_oldest_row_age_seconds``), for an app
        that runs an outbox relay next to its worker. It must be connected while sampled."""
        from oncely.stores.outbox import OutboxRelay

        self.observer.watch_outbox(outbox.outbox if isinstance(outbox, OutboxRelay) else outbox)

    def enable_timings(self) -> None:
        """Start timing handler runs and store calls (``Stats.handler_seconds`` and
        ``store_seconds``); off by default because each costs two clock reads per call. The
        metrics server and the status page turn it on."""
        for stats in self.handler_stats.values():
            stats.enable_timings()

    def snapshot(self) -> dict[str, Any]:
        """What the worker is doing now, JSON-ready: its state, broker and store, and per
        handler the counters, in-flight count and timings. ``/status.json`` serves it."""
        broker = self.broker if self.broker is not None else self._broker_arg
        store = self._store_arg
        return snapshot(
            self.specs,
            self.handler_stats,
            {pool.runner.spec.name: pool.in_flight for pool in self._pools},
            state=self.state,
            failure=self.failure,
            started_at=self._started_at,
            broker_url=(broker if isinstance(broker, str) else broker.url) or "",
            store=store if store is None or isinstance(store, str) else type(store).__name__,
        ) | {"health": self.observer.health()}

    async def _status_route(self, query: Mapping[str, str]) -> Response:
        body = msgspec.json.encode(self.snapshot())
        return Response(200, body, "application/json")

    async def serve_http(
        self, port: int, host: str = "127.0.0.1", *, metrics: bool | None = None
    ) -> int:
        """Serve ``endpoints`` on ``host:port`` until the worker stops, with timings and the
        health checks on; return the port (useful with ``port=0``).

        Args:
            metrics: ``True`` requires ``/metrics`` (the ``metrics`` extra), ``False`` leaves
                it out, ``None`` serves it when the extra is installed.

        Raises:
            MissingExtra: ``metrics=True`` without prometheus-client installed.
            OSError: the address cannot be bound.
        """
        if metrics:
            require_metrics()
        if metrics is False:
            self.endpoints.remove("/metrics")
        self.enable_timings()
        self.observer.start()
        server = await self.endpoints.serve(host, port)
        bound: int = server.sockets[0].getsockname()[1]
        return bound
