"""A consumer span per handler run, when OpenTelemetry is on (see ``oncely._tracing_headers``).

``Runner`` asks ``for_handler`` once; with tracing off it gets ``None`` and its hot path tests
only that. With tracing on, the returned ``Tracing`` replaces the runner's ``Settler`` (it is
one, so every ack, nack and dead letter records the run's outcome) and the runner calls
``enter`` before each run and ``end()`` on what it returned after it, ``begun`` once the store
answered for a key, and ``failed`` with a handler's exception.

The span is ``process <topic>`` (kind CONSUMER), a child of the context the publisher put in
the message headers, and the current span while the handler runs, so what the handler
publishes (``ctx.publish``, ``ctx.produce``, ``app.publish``) joins the same trace.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from oncely._tracing_headers import describe, messaging_system, tracer
from oncely.brokers.base import REASON_LIMIT, clip_error
from oncely.runtime._settle import TAIL, Settler
from oncely.stores.base import Outcome

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # then ``tracer()`` is None and nothing below runs
    pass

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from oncely.brokers.base import Broker, Delivery
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.stats import Stats
    from oncely.stores.base import Begin

__all__ = ["ACKED", "DEAD_LETTERED", "DEFERRED", "DUPLICATE", "RETRIED", "Tracing", "for_handler"]

ACKED = "acked"
RETRIED = "retried"
DEAD_LETTERED = "dead-lettered"
DUPLICATE = "duplicate"
DEFERRED = "deferred"
SETTLE_FAILED = "settle-failed"
"""The broker refused the ack, nack or reject: the message comes back after its visibility."""

log = logging.getLogger("oncely.worker")

OUTCOME = "oncely.outcome"
KEY = "oncely.idempotency_key"


class _Run:
    """One traced run: its span, the context token to detach, and what happened."""

    __slots__ = ("duplicate", "failed", "ident", "runs", "span", "token")

    def __init__(self, span: Span, token: object, runs: dict[int, _Run], ident: int) -> None:
        self.span = span
        self.token = token
        self.runs = runs
        self.ident = ident
        self.duplicate = False
        self.failed = False

    def end(self, rest: asyncio.Task[object] | None = None) -> None:
        """End the span; call in the task (and context) that ``Tracing.enter`` ran in. With
        ``rest`` (the task a cancel handed the run's settle to), the span ends when that task
        does, with the outcome it records. Never raises."""
        try:
            otel_context.detach(self.token)  # type: ignore[arg-type]
        except Exception:
            _broken()
        if rest is None:
            self.close()
        else:
            rest.add_done_callback(lambda _: self.close())

    def close(self) -> None:
        self.runs.pop(self.ident, None)
        try:
            self.span.end()
        except Exception:
            _broken()


def _broken() -> None:
    """Tracing must never change what happens to a message: a failure in it (a span
    processor's bug, an exception whose ``str()`` raises) is logged, and the run goes on."""
    log.warning("tracing failed; the message is handled regardless", exc_info=True)


def for_handler(spec: HandlerSpec, broker: Broker, stats: Stats) -> Tracing | None:
    """The tracing settler of one handler, or ``None`` when tracing is off."""
    t = tracer()
    if t is None:
        return None
    return Tracing(t, messaging_system(broker.url), spec, broker, stats)


class Tracing(Settler):
    """Spans of one handler's runs; also that handler's ``Settler``."""

    __slots__ = ("_instead", "_runs", "handler", "system", "tracer")

    def __init__(
        self, tracer: Tracer, system: str, spec: HandlerSpec, broker: Broker, stats: Stats
    ) -> None:
        super().__init__(spec.name, broker.capabilities, stats)
        self.tracer = tracer
        self.system = system
        self.handler = spec.name
        # Keyed by the delivery object: a settle after ``end()`` (a cancelled run's outcome
        # finishing later) finds nothing and records nothing on the ended span.
        self._runs: dict[int, _Run] = {}
        self._instead: set[int] = set()  # nacks dead-lettered instead, being returned

    def enter(self, delivery: Delivery) -> _Run | None:
        """Start the run's span, parented by the message's trace context, and make it current
        in this task. Never raises (``None`` if tracing failed)."""
        try:
            return self._enter(delivery)
        except Exception:
            _broken()
            return None

    def _enter(self, delivery: Delivery) -> _Run:
        parent = propagate.extract(delivery.headers)
        attributes: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.destination.name": delivery.topic,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": delivery.id,
            "oncely.handler": self.handler,
            "oncely.attempt": delivery.attempt,
        }
        span = self.tracer.start_span(
            f"process {delivery.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        run = self._runs[id(delivery)] = _Run(span, token, self._runs, id(delivery))
        return run

    def begun(self, delivery: Delivery, key: str, begin: Begin) -> None:
        """The store answered for ``key``: record it, and mark a duplicate short-circuit.
        Never raises."""
        run = self._runs.get(id(delivery))
        if run is None:
            return
        try:
            run.span.set_attribute(KEY, key)
            if begin.outcome is Outcome.COMPLETED:
                run.duplicate = True
                run.span.add_event("oncely.duplicate", {KEY: key})
        except Exception:
            _broken()

    def failed(self, delivery: Delivery, exc: BaseException) -> None:
        """The handler raised ``exc``: record it and mark the span ERROR. Never raises."""
        run = self._runs.get(id(delivery))
        if run is None:
            return
        run.failed = True
        try:
            run.span.set_status(Status(StatusCode.ERROR, describe(exc)))
            run.span.record_exception(exc)
        except Exception:
            _broken()

    def _outcome(self, delivery: Delivery, ok: bool, outcome: str, error: str | None) -> None:
        run = self._runs.get(id(delivery))
        if run is None:
            return
        try:
            if not ok:
                run.span.set_attribute(OUTCOME, SETTLE_FAILED)
                return
            duplicate = run.duplicate and outcome == ACKED
            run.span.set_attribute(OUTCOME, DUPLICATE if duplicate else outcome)
            if error is not None:
                if outcome == DEAD_LETTERED:
                    run.span.set_attribute("oncely.dead_letter_reason", error)
                if not run.failed:
                    run.span.set_status(Status(StatusCode.ERROR, error))
        except Exception:
            _broken()

    async def ack(self, delivery: Delivery) -> bool:
        ok = await super().ack(delivery)
        self._outcome(delivery, ok, ACKED, None)
        return ok

    async def nack(
        self, delivery: Delivery, delay: float, *, defer: bool = False, error: str | None = None
    ) -> bool:
        ok = await super().nack(delivery, delay, defer=defer, error=error)
        if not ok and id(delivery) in self._instead:
            self._instead.discard(id(delivery))
            return ok  # its outcome, a dead letter, is recorded
        if defer:
            self._outcome(delivery, ok, DEFERRED, None)
        else:
            self._outcome(delivery, ok, RETRIED, "retried")
        return ok

    def dead_lettered_instead(self, delivery: Delivery) -> None:
        super().dead_lettered_instead(delivery)
        self._instead.add(id(delivery))
        self._outcome(delivery, True, DEAD_LETTERED, None)

    async def dead_letter(
        self, delivery: Delivery, reason: str, *, logged: str | None = None
    ) -> bool:
        ok = await super().dead_letter(delivery, reason, logged=logged)
        # Spans leave the process as log lines do: the reason as logged (without the values a
        # decode error quotes from the payload).
        shown = reason if logged is None else logged
        self._outcome(delivery, ok, DEAD_LETTERED, clip_error(shown, REASON_LIMIT, tail=TAIL))
        return ok
