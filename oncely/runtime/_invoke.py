"""Calling a handler: under its timeout and the heartbeat, inside the store's transaction
when it is transactional, its return value encoded for the result cache."""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from oncely.errors import HandlerTimeout, LeaseLost
from oncely.runtime.codec import encode
from oncely.runtime.context import Context
from oncely.runtime.heartbeat import Active
from oncely.stores.base import TransactionalStore

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.heartbeat import Heartbeat
    from oncely.runtime.publisher import Publisher
    from oncely.runtime.stats import Stats
    from oncely.stores.base import IdempotencyStore

log = logging.getLogger("oncely.worker")


class Escaped(Exception):
    """A ``BaseException`` that is not an ``Exception`` (a library's own unwinding signal,
    ``sys.exit()``), raised by user code: settled as the failure of its message it is. Past
    every ``except Exception`` it would kill the pool's task instead, leaving the delivery
    unsettled and its key leased, to come back and do the same for ever. ``stops``: it is
    ``KeyboardInterrupt`` or ``SystemExit``, raised on once the message is settled."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error
        self.stops = isinstance(error, KeyboardInterrupt | SystemExit)

    def __repr__(self) -> str:
        return repr(self.error)


def raised(exc: Exception) -> BaseException:
    """What user code raised: ``exc``, or the ``BaseException`` an ``Escaped`` carries."""
    return exc.error if isinstance(exc, Escaped) else exc


def stop_if_asked(exc: Exception) -> None:
    """Raise the ``KeyboardInterrupt`` or ``SystemExit`` user code raised, its message settled
    (as a failure: the attempt is spent, so a handler that always exits is dead-lettered in
    the end rather than stopping every worker it reaches for ever). The pool hands it to the
    worker, which stops gracefully and then raises it on (``oncely.runtime._exit``)."""
    if isinstance(exc, Escaped) and exc.stops:
        raise exc.error


class Invoke:
    """Calls one handler (one instance per handler per worker, owned by its ``Runner``)."""

    def __init__(
        self,
        spec: HandlerSpec,
        heartbeat: Heartbeat,
        store: IdempotencyStore | None,
        publisher: Publisher,
        stats: Stats,
    ) -> None:
        self.spec = spec
        self.heartbeat = heartbeat
        self.store = store
        self.publisher = publisher
        self.stats = stats

    async def __call__(
        self,
        delivery: Delivery,
        payload: Any,
        key: str | None,
        lease_key: str,
        token: str | None,
        task: asyncio.Task[Any] | None = None,
    ) -> bytes | None:
        """Run the handler under its timeout and heartbeat; return the encoded result.
        ``lease_key`` and ``token`` are the lease's, if one was taken (``token`` not ``None``);
        ``task`` is the current task, if the caller knows it (else it is looked up)."""
        spec = self.spec
        # No getpid per delivery (Heartbeat.current_task), nor a look-up if the pool said.
        active = Active(delivery, task or self.heartbeat.current_task())
        transactional = False
        if token is not None:
            # The heartbeat renews transactional leases too: a transaction may wait for a
            # connection (or, on PostgreSQL, run) longer than the lease.
            active.lease_key, active.lease_token = lease_key, token
            transactional = spec.transactional
        # The heartbeat's one timer per handler times it out (Active.expire): same effect as
        # asyncio.timeout(), without a timer armed and cancelled per delivery.
        self.heartbeat.track(active, spec.timeout)
        timing = self.stats.handler_seconds
        started = perf_counter() if timing is not None else 0.0
        try:
            if transactional:
                assert token is not None
                return await self._in_transaction(delivery, payload, key, lease_key, token)
            if spec.wants_context:
                value = await spec.fn(payload, Context(delivery, key, self.publisher))
            else:
                value = await spec.fn(payload)
            return None if value is None else self._encode_result(value, delivery)
        except asyncio.CancelledError:
            if not (active.timed_out or active.lease_lost) or active.task is None:
                raise
            active.task.uncancel()
            raise self._cut_short(active, key) from None
        except Exception as exc:
            # A cancel the handler (or a driver in it) turned into an error of its own is still
            # that cancel: a delivery starts with none pending (Pool), so one now was thrown in.
            # A shutdown's must give the message back, not spend (or end) its attempts.
            task = active.task
            if task is None or not task.cancelling():
                raise
            if not (active.timed_out or active.lease_lost):
                raise asyncio.CancelledError from exc
            task.uncancel()
            raise self._cut_short(active, key) from exc
        except GeneratorExit:
            raise  # the coroutine is being closed
        except BaseException as exc:
            raise Escaped(exc) from exc
        finally:
            self.heartbeat.untrack(active)
            if timing is not None:
                timing.observe(perf_counter() - started)

    async def _in_transaction(
        self, delivery: Delivery, payload: Any, key: str | None, lease_key: str, token: str
    ) -> bytes | None:
        """The handler run inside the store transaction that records its completion."""
        spec = self.spec
        assert isinstance(self.store, TransactionalStore)
        async with self.store.transaction(lease_key, token, spec.result_ttl) as tx:
            if spec.wants_context:
                value = await spec.fn(payload, Context(delivery, key, self.publisher, tx))
            else:
                value = await spec.fn(payload)
            result = self._encode_result(value, delivery)
            tx.result = result
        return result

    def _cut_short(self, active: Active, key: str | None) -> Exception:
        """What a run the heartbeat cancelled (``active.timed_out`` or ``lease_lost``) fails
        with."""
        if active.timed_out:
            return HandlerTimeout(f"handler ran past its {self.spec.timeout}s timeout")
        return LeaseLost(f"lease on {key!r} was taken over while the handler ran")

    def _encode_result(self, value: object, delivery: Delivery) -> bytes | None:
        if value is None:
            return None
        try:
            return encode(value)
        except Exception as exc:
            # The effect already happened: a return value that cannot be cached must not turn
            # a success into a retry (which would run the effect again). Any exception: msgspec
            # raises RecursionError, not TypeError, on a value that contains itself.
            self.stats.results_not_cached += 1
            log.error(
                "%s: message %s ran, but its result is not cached: cannot encode it (%s: %s); "
                "the key completes without it, so a duplicate's on_duplicate gets None",
                self.spec.name,
                delivery.id,
                type(exc).__name__,
                exc,
            )
            return None
