"""How one delivery is run and settled: the careful part of the worker.

Order matters everywhere here:
- the completion is recorded in the store *before* the ack, so a crash between the two leaves
  a redelivery that finds ``COMPLETED`` and is acked without running;
- a lease is released *before* the nack, so the redelivery can take the key at once;
- a cancelled handler (shutdown) is released and nacked with no delay, shielded from the
  cancellation itself, so nothing is acked that did not finish;
- the outcome of a run that is over (recorded and acked, or released and nacked as a
  failure) is settled whole, whatever cancel arrives meanwhile (``oncely.runtime._finish``).

Every delivery is settled one way or another: a poison payload (anything decoding, key
extraction or fingerprinting raises) is dead-lettered with its reason, and a bug in the
runtime's own code is logged with its traceback and the delivery nacked with a short delay,
until its attempts run out: then it is dead-lettered too.
Deferrals (the store was down, another worker held the key, shutdown) nack with
``defer=True``, so they do not spend the handler's failure budget where the broker can keep
the attempt.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from oncely._logging import MESSAGE, redact_values
from oncely.brokers.base import Headers
from oncely.runtime._failures import FailurePaths, describe
from oncely.runtime._finish import Finisher, vouched
from oncely.runtime._invoke import Invoke, raised, stop_if_asked
from oncely.runtime._keys import Keys, Lease
from oncely.runtime._settle import Settler, is_settled
from oncely.runtime._success import SuccessPaths
from oncely.runtime._tracing import for_handler
from oncely.runtime.codec import Decoder, fingerprint
from oncely.runtime.heartbeat import Heartbeat
from oncely.stores.base import Outcome

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, Delivery
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.publisher import Publisher
    from oncely.runtime.stats import Stats
    from oncely.stores.base import IdempotencyStore

log = logging.getLogger("oncely.worker")

# Module constants: on Python 3.11 reading an enum member off its class (``Outcome.NEW``) runs
# the enum metaclass's attribute hook, ~1 k instructions a read, three reads per message.
DEDUPE_KEY = Headers.DEDUPE_KEY
NEW, IN_PROGRESS = Outcome.NEW, Outcome.IN_PROGRESS

INTERNAL_ERROR_DELAY = 1.0
"""Seconds before a delivery the runtime itself failed on is tried again."""


class Runner(SuccessPaths, FailurePaths):
    """Runs deliveries of one handler. One instance per handler per worker.

    The settle of a success under a lease it inherits from ``SuccessPaths``
    (``oncely.runtime._success``), the others from ``FailurePaths``
    (``oncely.runtime._failures``)."""

    def __init__(
        self,
        spec: HandlerSpec,
        broker: Broker,
        store: IdempotencyStore | None,
        publisher: Publisher,
        stats: Stats,
        *,
        fail_open: bool,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.store = store
        self.publisher = publisher
        self.stats = stats
        self.fail_open = fail_open
        self._key_prefix = f"{spec.name}:"
        self._auto_key = spec.key.kind == "auto"
        self._results = Decoder(spec.result_type if spec.on_duplicate else Any)
        self._finish = Finisher(broker, store, spec.name, stats)
        self.settle = Settler(spec.name, broker.capabilities, stats)
        self.tracing = for_handler(spec, broker, stats)  # None unless OpenTelemetry is on
        if self.tracing is not None:
            self.settle = self.tracing
        self.keys = (
            Keys(spec.name, store, stats, visibility=spec.visibility)
            if store is not None and spec.uses_store
            else None
        )
        self.heartbeat = Heartbeat(
            spec.name,
            spec.visibility,
            extend=broker.capabilities.extend,
            store=store if spec.uses_store else None,
            stats=stats,
        )
        # A success acked with its completion as the ack's condition (``_chained``): where
        # the store can queue the completion without awaiting it and the broker's ack batch
        # can wait for it. Not with tracing (its ack span) or store timings (per call).
        self._chain = (
            self.keys is not None
            and not spec.transactional
            and self.tracing is None
            and vouched(store, "completes_soon", "complete")
            and vouched(broker, "acks_after", "consume")
        )
        # The bound method, not the instance: calling an object runs its type's ``__call__``
        # look-up and a call from C on every message, a method is called inline.
        self._invoke = Invoke(spec, self.heartbeat, store, publisher, stats).__call__

    async def aclose(self) -> None:
        """Finish the successes and give-backs a cancel cut short, then stop the heartbeat; call
        once no delivery of this handler runs any more."""
        await self._finish.wait()
        await self.heartbeat.aclose()

    async def run(self, delivery: Delivery, task: asyncio.Task[Any] | None = None) -> None:
        """Run the handler on ``delivery`` and settle it. Never raises except on cancel.

        ``task`` is the task this runs on, if the caller knows it (the pool's tasks do): the
        timeout cancels it, and looking it up costs two calls per delivery."""
        self.stats.received += 1
        traced = None if self.tracing is None else self.tracing.enter(delivery)
        # Log lines about this delivery carry its fields (oncely._logging); emptied after, so
        # neither tasks started meanwhile nor this pooled task keep them. Not reset: the
        # emptied list left in this task's context is as good as none (and equal to the one
        # the pool set, see Pool._work), and a reset would keep a token and make a new
        # context mapping per message, objects that live across the ack and bring the next
        # garbage collection sooner.
        current = [self.spec.name, delivery]
        MESSAGE.set(current)
        acking = False
        try:
            if await self._run(delivery, task, current):
                # The ack, done here rather than down in _run: while a (batched) ack is on its
                # way, this coroutine is all a message holds, not _run's frame with its
                # payload too. Fewer objects live per message in flight, fewer garbage
                # collections run.
                acking = True
                if self.tracing is not None:
                    if await self.settle.ack(delivery):
                        self.stats.processed += 1
                else:
                    # Settler.ack inlined.
                    try:
                        await delivery.ack()
                    except Exception:
                        self.settle.ack_failed(delivery)
                    else:
                        stats = self.stats
                        stats.acked += 1
                        stats.processed += 1
        except asyncio.CancelledError:
            # A cancel during the ack of a handler that finished (the end of the shutdown
            # grace) gives nothing back: the broker's ack goes on without its caller (or the
            # message comes back after its visibility), and a give-back would fail against
            # it or, were it first, run the finished handler again.
            if (
                not acking
                and self.spec.guarantee != "at_most_once"  # acked before it runs: lost
                and not is_settled(delivery)
                and not self._finish.has(delivery)
            ):
                # Cancelled before the handler ran (shutdown): give it straight back.
                await self._finish(self.settle.nack(delivery, 0.0, defer=True), delivery)
            raise
        except Exception as exc:
            self.stats.internal_errors += 1
            log.exception("%s: internal error on %s; nacking it", self.spec.name, delivery.id)
            if is_settled(delivery):
                return
            if self.spec.retry.exhausted(delivery.attempt):
                # A runtime bug (or a third-party store's) that this message triggers every
                # time must not loop it for ever: the attempts run out as for a failure.
                await self._dead_letter(
                    delivery,
                    f"internal error: {describe(exc)} (gave up after {delivery.attempt} attempts)",
                )
            else:
                error = f"internal error: {describe(exc)}"
                nack = self.settle.nack(delivery, INTERNAL_ERROR_DELAY, error=error)
                await self._finish(nack, delivery)
        finally:
            finish = self._finish
            rest = finish.task_of(delivery) if finish.handed else None  # no call, nearly always
            if rest is None:
                current.clear()
                if traced is not None:
                    traced.end()
            else:
                # The settle runs on in a task that copied this context: its lines are still
                # about this message, and the span ends with the outcome it records.
                _clear_when_done(rest, current)
                MESSAGE.set([])  # this pooled task is done with the message meanwhile
                if traced is not None:
                    traced.end(rest)

    async def _run(
        self, delivery: Delivery, task: asyncio.Task[Any] | None, current: list[Any]
    ) -> bool:
        """Run and settle ``delivery``, except the ack of a success without a lease: ``True``
        when it is left to the caller (``run``). ``current`` is the delivery's log fields."""
        spec = self.spec
        try:
            payload = spec.decoder.decode(delivery.body)
        except Exception as exc:
            # Decoding has no side effects, so even an at-most-once poison message can go to
            # the dead-letter queue rather than vanish. Not only DecodeError: msgspec before
            # 0.23 raises UnicodeDecodeError for invalid UTF-8 inside a JSON string, for one.
            why = describe(exc)
            await self._dead_letter(
                delivery,
                f"undecodable payload: {why}",
                logged=f"undecodable payload: {redact_values(why)}",  # logs never show payloads
            )
            return False
        if spec.guarantee == "at_most_once":
            await self._at_most_once(delivery, payload, task)
            return False
        # The lease, if one is taken, as two strings: no Lease object on the success path.
        store_key = ""
        token: str | None = None
        key: str | None = None
        keys = self.keys
        if keys is not None:
            try:
                if self._auto_key:
                    # KeySource.extract for "auto", inlined: a call less per message.
                    key = delivery.headers.get(DEDUPE_KEY) or delivery.key
                else:
                    key = spec.key.extract(payload, delivery)
                if key is not None:
                    if not isinstance(key, str):
                        raise TypeError(f"key must be a str, got {type(key).__name__}")
                    # A lone surrogate (a JSON "\ud800" escape) has no UTF-8 form: a store
                    # refuses it on every redelivery, which would defer the message for ever.
                    # An ASCII key has one (isascii reads a flag; encode makes a bytes object).
                    if not key.isascii():
                        key.encode()
            except Exception as exc:
                # A key function that fails on this payload will fail on every redelivery.
                await self._dead_letter(delivery, f"key extraction failed: {exc!r}")
                return False
            # note_key, inlined: log lines from here on show this key, not the header's.
            current.append(key)
            if key is None and spec.transactional:
                # No key, no lease, no transaction: the handler cannot run as declared.
                await self._dead_letter(
                    delivery, "message has no idempotency key (a transactional handler needs one)"
                )
                return False
            if key is None and spec.on_missing_key == "reject":
                await self._dead_letter(delivery, "message has no idempotency key")
                return False
            if key is not None:
                # Claim the key (inline, and Keys.begin too: two coroutines less per message).
                store_key = self._key_prefix + key
                try:
                    fp = fingerprint(delivery.body)
                except Exception as exc:
                    await self._dead_letter(delivery, f"cannot fingerprint payload: {exc!r}")
                    return False
                try:
                    if self.stats.store_seconds is None:
                        begin = await keys.store.begin(store_key, fp, keys.visibility)
                    else:
                        begin = await keys.timed_begin(store_key, fp)
                    outcome = begin.outcome
                    if outcome is IN_PROGRESS:
                        begin = await keys.in_progress(store_key, fp, begin)
                    elif outcome is NEW and store_key not in keys.held and not keys.deferred:
                        keys.held[store_key] = None  # Keys.begun, inlined for the usual case
                    else:
                        keys.begun(store_key, begin)
                except Exception as exc:
                    if not await self._begin_failed(delivery, key, store_key, exc):
                        return False
                else:
                    if self.tracing is not None:
                        self.tracing.begun(delivery, key, begin)
                    if begin.outcome is not NEW:
                        await self._not_new(delivery, key, store_key, begin)
                        return False
                    token = begin.token
                    assert token is not None
        # Invoke the handler and settle the outcome (inline: a coroutine less per message).
        try:
            result = await self._invoke(delivery, payload, key, store_key, token, task)
        except asyncio.CancelledError:
            await self._finish(self._give_back(delivery, _lease(store_key, token)), delivery)
            raise
        except Exception as exc:
            # The run is over: a shutdown cancel must not turn its failure into a give-back
            # (a deferral, which would not spend the attempt).
            lease = _lease(store_key, token)
            await self._finish(self._ran_and_failed(delivery, lease, exc), delivery)
            stop_if_asked(exc)
        else:
            if token is None:
                return True  # just the ack, in run: no task on the hot path without a store
            # The effect happened: recording it and acking are not cut short by a shutdown
            # cancel (a give-back now would run the effect again).
            if self._chain and self.stats.store_seconds is None:
                settling = self._chained(delivery, store_key, token, result)
            else:
                settling = self._succeeded(delivery, store_key, token, result)
            finish = self._finish
            if finish.inline_success:
                # Finisher(...) inlined: the settle's first step runs here, and one that
                # ends without suspending (the in-process backends) needs no ``whole``.
                try:
                    waiting = settling.send(None)
                except StopIteration:
                    return False
                await finish.resume(settling, waiting, delivery)
            else:
                await finish(settling, delivery, success=True)
        return False

    async def _at_most_once(
        self, delivery: Delivery, payload: Any, task: asyncio.Task[Any] | None
    ) -> None:
        # Acked before the handler runs: a crash or failure from here on loses the message,
        # which is the contract the handler asked for. A cancel during the ack loses it too:
        # the ack goes on without its caller, so nothing is given back (``run``).
        try:
            if not await self.settle.ack(delivery):
                return
            await self._invoke(delivery, payload, None, "", None, task)
        except asyncio.CancelledError:
            self.stats.lost += 1
            log.warning(
                "%s: at-most-once message %s cancelled at shutdown; it was acked, so it is lost",
                self.spec.name,
                delivery.id,
            )
            raise
        except Exception as exc:
            if self.tracing is not None:
                self.tracing.failed(delivery, raised(exc))
            self.stats.failed += 1
            log.warning("%s: at-most-once message %s failed: %r", self.spec.name, delivery.id, exc)
            stop_if_asked(exc)
        else:
            self.stats.processed += 1


def _lease(store_key: str, token: str | None) -> Lease | None:
    """The lease a run took, if any, as the failure paths take it."""
    return None if token is None else Lease(store_key, token)


def _clear_when_done(task: asyncio.Task[object], current: list[Any]) -> None:
    """Empty ``current`` (a delivery's log fields) once ``task`` is done. Not a lambda in
    ``Runner.run``: a closure there makes ``current`` a cell, one more object per message."""
    task.add_done_callback(lambda _: current.clear())
