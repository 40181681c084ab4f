"""The outbox relay: claim committed rows, publish them with confirms, mark them sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, OncelyError
from oncely.stores._outbox_base import DEFAULT_TABLE, backoff
from oncely.stores._outbox_publish import publish_rows
from oncely.stores._outbox_table import Outbox

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from oncely.brokers.base import Broker

__all__ = ["OutboxRelay", "RelayStats"]

log = logging.getLogger("oncely.outbox")

WEEK = 7 * 86400.0
PURGE_BATCH = 1000
"""Rows one retention statement deletes at most, so a backlog never holds long locks."""
WITHHELD_PAUSE = 0.02
"""Pause after a batch whose rows waited behind another relay's older rows of their key."""
RESTART_DELAY = (0.5, 30.0)
"""First and largest pause before a supervised task that died is started again."""


@dataclass(slots=True)
class RelayStats:
    """What a relay did. Counters only grow.

    Attributes:
        published: rows the broker confirmed and the relay marked sent.
        failed: publishes that failed (each is retried later).
        batches: claims that published at least one row.
        withheld: rows claimed but left for later, behind an older row of their key that
            another relay held.
        purged: sent rows deleted by retention.
        errors: relay passes that failed on the database (retried with backoff).
    """

    published: int = 0
    failed: int = 0
    batches: int = 0
    withheld: int = 0
    purged: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class OutboxRelay:
    """Publishes an outbox's committed rows to a broker; see ``oncely.stores.outbox``.

    Args:
        outbox: an ``Outbox``, or its database URL (the relay then owns and closes it).
        broker: a broker URL or instance. A URL's broker is owned (closed on stop); an
            instance is connected if needed but never closed here.
        batch: rows claimed per transaction (and the most publishes in flight).
        poll: seconds between looks for new rows when no notification came.
        retention: seconds a sent row is kept before it is deleted; ``None`` keeps them.
        publish_timeout: seconds one publish may take before it counts as failed.
        retry_base, retry_cap: a failed row waits ``retry_base * 2**(attempts-1)`` seconds,
            at most ``retry_cap``, before it is tried again; a relay whose whole batch failed
            (the broker is down) pauses the same way.
        table: the outbox table, when ``outbox`` is a URL.

    Use ``async with OutboxRelay(...)``, or ``start()`` and ``stop()``, or ``run()`` (until
    ``stop()``). Several relays may run against one outbox, in one process or many. No signal
    handlers are installed; construction does no I/O.
    """

    def __init__(
        self,
        outbox: Outbox | str,
        broker: str | Broker,
        *,
        batch: int = 100,
        poll: float = 1.0,
        retention: float | None = WEEK,
        publish_timeout: float = 30.0,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        table: str = DEFAULT_TABLE,
    ) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
        for name, value in (
            ("poll", poll),
            ("publish_timeout", publish_timeout),
            ("retry_base", retry_base),
            ("retry_cap", retry_cap),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if retention is not None and not retention >= 0:
            raise ConfigError(f"retention must be >= 0 seconds or None, got {retention!r}")
        self._owns_outbox = isinstance(outbox, str)
        self._close_outbox = self._owns_outbox
        self.outbox = Outbox.from_url(outbox, table=table) if isinstance(outbox, str) else outbox
        self._owns_broker = isinstance(broker, str)
        self.broker = broker_from_url(broker)
        self.batch = batch
        self.poll = poll
        self.retention = retention
        self.publish_timeout = publish_timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        # SQLite claims are leases that nobody renews, and a PostgreSQL claim is a transaction
        # held open while publishing: a batch starts no publish after half the lease, so its
        # last one ends (or times out) well within it. Otherwise a slow batch's rows would be
        # claimed again by another relay while still being published (SQLite), or the claim
        # would sit idle in its transaction for as long as one key's rows take.
        self.lease = max(60.0, 4 * publish_timeout)
        idle, dialect = self.outbox.backend.max_claim_idle, self.outbox.backend.dialect
        if idle is not None and self.lease / 2 + publish_timeout > idle:
            # lease / 2 + publish_timeout: the last publish may start just before the deadline.
            raise ConfigError(
                f"publish_timeout={publish_timeout:g} is too long for a {dialect} outbox: a "
                f"claim's transaction stays open while its batch publishes, up to "
                f"{self.lease / 2 + publish_timeout:g} s here, past what the relay's sessions "
                f"allow (idle_in_transaction_session_timeout, {idle:g} s with a margin); use at "
                f"most {idle / 3:g}"
            )
        self.stats = RelayStats()
        self.idle = False
        """True while the relay waits for new rows (a notification or the next poll)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._cut_short = False
        self._loop_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"OutboxRelay({self.outbox!r}, {self.broker.url!r})"

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect the outbox and the broker, then relay in background tasks.

        Raises:
            StoreUnavailable: the database could not be reached.
            ConnectionLost: the broker could not be reached.
            ConfigError: credentials refused, bad table name.
        """
        if self._stopping is not None:
            raise RuntimeError("relay already started")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        # An outbox the relay connected is the relay's to close; one already open is not.
        self._close_outbox = self._owns_outbox or not self.outbox.backend.connected
        try:
            await self.outbox.connect()
            await self.broker.connect()
        except BaseException:
            await self._close_owned()
            self._stopped.set()
            raise
        wake = self._wake.set
        self._loop_task = self._spawn("relay", self._relay_loop)
        self._spawn("listen", lambda: self.outbox.backend.listen(wake))
        if self.retention is not None:
            self._spawn("retention", self._retention_loop)
        log.info(
            "outbox relay started: %s (table %s) -> %s",
            self.outbox.url,
            self.outbox.table,
            self.broker.url,
        )

    async def stop(self, grace: float | None = 30.0) -> None:
        """Stop: finish the batch in flight (within ``grace`` seconds; ``None`` waits as
        long as it takes, ``0`` stops at once), then close what the relay owns. A batch cut
        short is released unsent; rows it published already go out again later, with the
        same ids. Idempotent."""
        if self._stopping is None or self._stopped is None:
            return
        if self._stopping.is_set():
            if grace == 0:
                for task in self._tasks:
                    task.cancel()
            await self._stopped.wait()
            return
        self._stopping.set()
        for task in self._tasks:
            if task is not self._loop_task:
                task.cancel()
        if self._loop_task is not None:
            # asyncio.wait, not wait_for(shield(...)): a stop(0) meanwhile cancels the loop
            # task, and that must end this wait, not raise CancelledError out of this stop()
            # before it closed anything (the caller and stop(0) would then wait forever).
            done, _ = await asyncio.wait({self._loop_task}, timeout=grace)
            if not done:
                log.warning("outbox relay: batch still in flight after %ss; cancelling", grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_owned()
        log.info("outbox relay stopped: %s", self.stats.as_dict())
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` has finished."""
        if self._stopped is None:
            raise RuntimeError("relay not started")
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, then relay until ``stop()`` is called (from another task)."""
        await self.start()
        await self.wait_stopped()

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

    async def _close_owned(self) -> None:
        if self._owns_broker:
            with contextlib.suppress(Exception):
                await self.broker.aclose()
        if self._close_outbox:
            with contextlib.suppress(Exception):
                await self.outbox.aclose()

    def _spawn(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._supervise(name, body), name=f"oncely-outbox-{name}")
        self._tasks.append(task)
        return task

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` until the relay stops; restart it, with a pause, whenever it dies."""
        assert self._stopping is not None
        pause = RESTART_DELAY[0]
        while not self._stopping.is_set():
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay task %r died; restarting in %.1fs", name, pause)
            else:
                if self._stopping.is_set():
                    return
                log.error("outbox relay task %r ended; restarting in %.1fs", name, pause)
            await self._sleep(pause)
            pause = min(pause * 2, RESTART_DELAY[1])

    async def _sleep(self, seconds: float, *, wake: bool = False) -> None:
        """Sleep ``seconds``, or less if the relay stops (or, with ``wake``, rows arrive)."""
        assert self._stopping is not None and self._wake is not None
        events = [self._stopping] + ([self._wake] if wake else [])
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # -------------------------------------------------------------------------------- relay

    async def _relay_loop(self) -> None:
        assert self._stopping is not None and self._wake is not None
        failures = 0
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                claimed, sent, failed, withheld = await self.relay_once()
            except Exception as exc:
                failures += 1
                self.stats.errors += 1
                delay = backoff(failures, self.retry_base, self.retry_cap)
                # A database or broker error is expected here; anything else is a bug, and
                # this loop is the only place that sees it: keep its traceback.
                log.warning(
                    "outbox relay: %s; retrying in %.1fs",
                    exc,
                    delay,
                    exc_info=not isinstance(exc, OncelyError),
                )
                await self._sleep(delay)
                continue
            if failed and not sent:
                # Nothing got through: most likely the broker is down. Pause instead of
                # spinning through every row; each row keeps its own backoff as well.
                failures += 1
                delay = backoff(failures, self.retry_base, self.retry_cap)
                log.warning("outbox relay: %d publish(es) failed; pausing %.1fs", failed, delay)
                await self._sleep(delay)
                continue
            failures = 0
            if (claimed >= self.batch or self._cut_short) and sent:
                continue  # a backlog: the next batch at once
            if withheld:
                # Rows wait for another relay to finish their key's older rows: look again
                # soon, but do not spin on the database meanwhile.
                await self._sleep(min(self.poll, WITHHELD_PAUSE))
                continue
            self.idle = True
            try:
                await self._sleep(self.poll, wake=True)
            finally:
                self.idle = False

    async def relay_once(self) -> tuple[int, int, int, int]:
        """Claim one batch, publish it, mark it; return (claimed, sent, failed, withheld).

        Raises:
            StoreUnavailable, StoreError: the database failed; nothing was marked, so every
                row of the batch is published again later.
        """
        lease = self.lease
        deadline = asyncio.get_running_loop().time() + lease / 2
        claim = await self.outbox.backend.claim(self.batch, lease)
        claimed = len(claim.rows) + claim.withheld
        try:
            sent, failed = await publish_rows(
                self.broker,
                claim.rows,
                publish_timeout=self.publish_timeout,
                retry_base=self.retry_base,
                retry_cap=self.retry_cap,
                deadline=deadline,
            )
        except BaseException:
            await claim.abandon()
            raise
        # Rows the deadline left unpublished are released by finish: take them next.
        self._cut_short = len(sent) + len(failed) < len(claim.rows)
        await claim.finish(sent, failed)
        for failure in failed:
            log.warning("outbox row %d not published (%s)", failure.id, failure.error)
        self.stats.published += len(sent)
        self.stats.failed += len(failed)
        self.stats.withheld += claim.withheld
        self.stats.batches += 1 if sent else 0
        return claimed, len(sent), len(failed), claim.withheld

    async def _retention_loop(self) -> None:
        assert self.retention is not None
        assert self._stopping is not None
        every = min(60.0, max(self.retention / 2, 0.1))
        while not self._stopping.is_set():
            await self._sleep(every)
            try:
                while True:
                    deleted = await self.outbox.backend.purge(self.retention, PURGE_BATCH)
                    self.stats.purged += deleted
                    if deleted < PURGE_BATCH:
                        break
                    await asyncio.sleep(0)
            except Exception as exc:
                log.warning(
                    "outbox retention sweep failed (%s); trying again later",
                    exc,
                    exc_info=not isinstance(exc, OncelyError),
                )
