"""The worker: one consume loop per handler, bounded concurrency, graceful drain.

The worker never installs signal handlers and never creates or configures an event loop, so it
embeds in any running asyncio application::

    async with oncely.Worker(app, broker="sqlite:///jobs.db"):
        await serve_http()   # the worker consumes in the background meanwhile

Only the CLI maps SIGTERM/SIGINT to ``stop()``.

Each handler's deliveries run on a pool of at most ``concurrency`` long-lived tasks
(``oncely.runtime._consume.Pool``) rather than a task per message: each task runs one delivery
at a time, so a timeout, a lost lease or the end of the shutdown grace still cancels just that
handler, and no context variable a handler sets reaches another delivery.

Consume loops are supervised. What ends one decides what happens next:

- a ``BrokerError`` (connection lost, channel closed, a fetch failed): transient, so the loop
  resubscribes with a backoff from 0.1 s up to 5 s (``RESUBSCRIBE_DELAY``), however long it takes;
- a ``ConfigError``, ``NotSupported``, ``ValueError`` or ``TypeError`` (``visibility=-1``, a
  bad topic name): a mistake no retry will fix, so the worker **stops** at once;
- anything else (a third-party adapter's ``RuntimeError``, say): logged with its traceback and
  resubscribed with the same backoff, but ``MAX_UNEXPECTED`` (5) such failures in a row without a
  delivery in between also stop the worker;
- a subscription that ends on its own while the worker runs: resubscribed, with a warning.

A worker that stops itself logs the cause with its traceback and keeps it in ``failure``;
``wait_stopped()`` then raises ``WorkerFailed``, so ``oncely run`` exits 1. A worker never
sits idle while it claims to consume.

A handler that raises ``KeyboardInterrupt`` or ``SystemExit`` (``sys.exit(n)``) has its message
settled as the failure it is and stops the worker as SIGTERM does: no message starts after it,
the others in flight finish within ``grace_period``; then it goes on (``oncely.runtime._exit``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, WorkerFailed
from oncely.runtime._consume import ConsumeLoop, Pool
from oncely.runtime._drain import Drain
from oncely.runtime._exit import raise_when_stopped
from oncely.runtime._handlers import select_handlers, warn_shared_topics
from oncely.runtime._observe import Observer, metrics_installed
from oncely.runtime._page import add_status_page
from oncely.runtime._process import Runner
from oncely.runtime._surfaces import Surfaces
from oncely.runtime.config import Settings
from oncely.runtime.http import Endpoints
from oncely.runtime.publisher import Publisher
from oncely.runtime.stats import Stats, Totals
from oncely.stores.base import IdempotencyStore, TransactionalStore
from oncely.stores.registry import store_from_url

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from types import TracebackType
    from typing import Self

    from oncely.brokers.base import Broker
    from oncely.runtime.app import App

__all__ = ["Worker"]

log = logging.getLogger("oncely.worker")


class Worker(Surfaces, Drain):
    """Runs an ``App``'s handlers against a broker.

    Args:
        app: the handlers.
        broker: a broker URL or instance; overrides ``settings.broker``.
        store: an idempotency store URL or instance; overrides ``settings.store``.
        settings: everything else (see ``Settings``); defaults apply when omitted.
        handlers: run only these handler names (default: all).

    Use ``async with Worker(...)`` or call ``start()`` and ``stop()``. Construction does no I/O.
    A broker or store given as an instance is connected if needed but not closed by the
    worker; one built from a URL is owned and closed on ``stop()``.
    """

    def __init__(
        self,
        app: App,
        *,
        broker: str | Broker | None = None,
        store: str | IdempotencyStore | None = None,
        settings: Settings | None = None,
        handlers: list[str] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or Settings()
        self._broker_arg = broker if broker is not None else self.settings.broker
        broker_url = self._broker_arg if isinstance(self._broker_arg, str) else self._broker_arg.url
        self._store_arg = store if store is not None else self.settings.store_url(broker_url)
        self.specs = select_handlers(app, self.settings, handlers)
        self.handler_stats: dict[str, Stats] = {spec.name: Stats() for spec in self.specs}
        """Each handler's counters (and timings, once ``enable_timings()`` was called)."""
        self.stats = Totals(list(self.handler_stats.values()))
        """The counters summed over the handlers, live."""
        self.endpoints = Endpoints()
        """The HTTP routes (``/status.json``, the status page ``/``, and what
        ``oncely.runtime.observe`` adds); serve them with ``serve_http()`` or mount
        ``endpoints.asgi``."""
        self.endpoints.add("/status.json", self._status_route)
        add_status_page(self.endpoints)
        self.observer = Observer(
            self,
            block_threshold=self.settings.loop_block_threshold,
            stall_timeout=self.settings.stall_timeout,
        )
        """Health checks (``/livez``, ``/readyz``) and the samples metrics read; idle until
        ``serve_http()`` or the first probe or scrape starts it."""
        self.endpoints.add("/livez", self.observer.livez)
        self.endpoints.add("/readyz", self.observer.readyz)
        if metrics_installed():
            self.endpoints.add("/metrics", self.observer.metrics)
        self._started_at: float | None = None
        self.broker: Broker | None = None
        self.store: IdempotencyStore | None = None
        self._owned: list[Broker | IdempotencyStore] = []
        self._loops: list[asyncio.Task[None]] = []
        self._runners: list[Runner] = []
        self._pools: list[Pool] = []
        self._stopping: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._deadline = 0.0
        self._started = False
        self._failed_start = False
        self._publisher: Publisher | None = None
        self._self_stop: asyncio.Task[None] | None = None
        self._exit: asyncio.Task[None] | None = None
        self.abandoned: set[asyncio.Task[None]] = set()
        """Handler tasks that ignored their cancel at shutdown and still ran when ``stop()``
        gave up on them (see ``stop``); their messages come back after their visibility."""
        self.failure: BaseException | None = None
        """What stopped the worker on its own (see the module docstring), else ``None``."""

    async def start(self) -> None:
        """Connect, then start consuming every handler's topic in background tasks.

        Raises:
            ConfigError: no store for an effectively-once handler, a transactional handler on
                a store without transactions, or a bad URL.
            ConnectionLost, StoreUnavailable: the broker or store could not be reached.
        """
        if self._started:
            raise RuntimeError("worker already started")
        self._started = True
        self._started_at = time.time()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()
        try:
            await self._connect()
        except BaseException:
            await self._start_failed()
            raise
        assert self.broker is not None
        publisher = Publisher(self.broker)
        try:
            for hook in self.app.startup_hooks:
                await hook()
        except BaseException:
            await self._start_failed()
            raise
        self._publisher = publisher
        self.app.bind(publisher)
        for spec in self.specs:
            runner = Runner(
                spec,
                self.broker,
                self.store,
                publisher,
                self.handler_stats[spec.name],
                fail_open=self.settings.fail_open,
            )
            self._runners.append(runner)
            pool = Pool(runner, spec.concurrency, on_exit=self._exit_asked)
            self._pools.append(pool)
            loop = asyncio.create_task(self._consume(runner, pool), name=f"consume:{spec.name}")
            loop.add_done_callback(self._loop_done)
            self._loops.append(loop)
        log.info(
            "worker started: %d handler(s) on %s", len(self.specs), self.broker.url or "broker"
        )

    async def _start_failed(self) -> None:
        # Endpoints served or mounted before start() must not report a worker that never ran
        # as running, nor stay open.
        self._failed_start = True
        await self._close_owned()
        await self.observer.aclose()  # its sampler task and loop-monitor thread
        await self.endpoints.aclose()

    async def _connect(self) -> None:
        self.broker = broker_from_url(self._broker_arg)
        if isinstance(self._broker_arg, str):
            self._owned.append(self.broker)
        for spec in self.specs:
            self.broker.check_topic(spec.topic)  # a name it refuses: ConfigError before I/O
        warn_shared_topics(self.specs)
        needs_store = [s for s in self.specs if s.uses_store]
        if needs_store:
            if self._store_arg is None:
                raise ConfigError(
                    f"handler {needs_store[0].name!r} is effectively-once but no idempotency "
                    "store is configured (set store=, ONCELY_STORE or --store)"
                )
            self.store = store_from_url(self._store_arg)
            if isinstance(self._store_arg, str):
                self._owned.append(self.store)
            for spec in needs_store:
                if spec.transactional and not isinstance(self.store, TransactionalStore):
                    raise ConfigError(
                        f"handler {spec.name!r} is transactional but the store "
                        f"{type(self.store).__name__} has no transactions"
                    )
            await self.store.connect()
        await self.broker.connect()

    async def _consume(self, runner: Runner, pool: Pool) -> None:
        assert self.broker is not None and self._stopping is not None
        loop = ConsumeLoop(
            self.broker, runner, self._stopping, runner.stats, pool=pool, fail=self._fail
        )
        await loop.run()

    def _fail(self, what: str, exc: BaseException) -> None:
        """Stop the worker loudly: a consume loop cannot go on."""
        log.critical("%s; stopping the worker", what, exc_info=exc)
        if self.failure is None:
            self.failure = exc
        if self._self_stop is None:
            self._self_stop = asyncio.create_task(self.stop(), name="oncely:self-stop")

    def _exit_asked(self, exc: BaseException) -> None:
        """A handler raised ``exc`` (``KeyboardInterrupt`` or ``SystemExit``), its message
        settled: stop as ``stop()`` does, then raise it on (see the module docstring). The
        first one wins; a later one (another handler's, meanwhile) is dropped."""
        if self._exit is not None:
            return
        assert self._stopping is not None and self._stopped is not None
        for pool in self._pools:
            # Deliveries the consume loops handed over earlier in this pass of the event
            # loop would otherwise start after this one asked to exit.
            pool.halted = True
        stopping: Awaitable[object]
        if not self._stopping.is_set():
            # Now, not on the task's first step: the consume loops fetch nothing more, so no
            # message starts after the one that asked to exit.
            self._halt(self.settings.grace_period)
            stopping = self._wind_down(self.settings.grace_period)
        else:
            stopping = self._stopped.wait()  # a stop() drains already
        self._exit = raise_when_stopped(stopping, exc)

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        # _consume catches everything; this is the last line should that ever change.
        if self.failure is not None:
            return
        if task.cancelled() or task.exception() is None:
            if self._stopping is not None and not self._stopping.is_set():
                self._fail(f"consume loop {task.get_name()} ended", RuntimeError("loop ended"))
            return
        self._fail(f"consume loop {task.get_name()} died", task.exception())  # type: ignore[arg-type]

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let in-flight handlers finish, then close.

        Handlers still running after ``grace`` seconds (default ``settings.grace_period``) are
        cancelled; each releases its idempotency lease and nacks its message with no delay so
        another worker takes it at once. Nothing is acked that did not finish. Idempotent: a
        second call while the first drains waits for it, and cuts the drain short if its
        ``grace`` ends sooner (a second signal stops at once). A handler that swallows its
        cancel and runs on is waited for until a later call's ``grace`` ends; then ``stop``
        gives up on it (``abandoned``), logs it and closes all the same.
        """
        if not self._started or self._stopping is None or self._stopped is None:
            return
        if self._failed_start:
            # start() closed what it had opened; the startup hooks did not all run, so the
            # shutdown hooks (which undo them) must not either.
            return
        assert self._hurry is not None
        grace = self.settings.grace_period if grace is None else grace
        if self._stopping.is_set():
            deadline = asyncio.get_running_loop().time() + max(grace, 0.0)
            if deadline < self._deadline:
                self._deadline = deadline
                self._hurry.set()
            await self._stopped.wait()
            return
        self._halt(grace)
        await self._wind_down(grace)

    def _halt(self, grace: float) -> None:
        """The first step of a stop, taken at once: fetch nothing more, and drain until
        ``grace`` seconds from now."""
        assert self._stopping is not None
        self._stopping.set()
        self._deadline = asyncio.get_running_loop().time() + max(grace, 0.0)
        for task in self._loops:
            if task is not asyncio.current_task():
                task.cancel()

    async def wait_stopped(self) -> None:
        """Wait until ``stop()`` has finished (for a CLI or a supervisor task).

        Raises:
            WorkerFailed: the worker stopped itself because a consume loop could not go on
                (the cause is ``failure``, and its traceback was logged).
        """
        if self._stopped is None:
            raise RuntimeError("worker not started")
        await self._stopped.wait()
        if self.failure is not None:
            raise WorkerFailed(
                f"the worker stopped: {type(self.failure).__name__}: {self.failure}"
            ) from self.failure

    @property
    def state(self) -> str:
        """``created``, ``running``, ``draining`` (stopping), ``stopped`` or ``failed``."""
        if not self._started or self._stopping is None or self._stopped is None:
            return "created"
        if self._stopped.is_set() or self._failed_start:
            return "failed" if self.failure is not None else "stopped"
        return "draining" if self._stopping.is_set() else "running"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
