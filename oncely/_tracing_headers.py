"""Trace context in message headers, and the producer spans, when OpenTelemetry is on.

Tracing is on when ``opentelemetry-api`` is installed (extra ``otel``) and the application has
set a tracer provider (``trace.set_tracer_provider``, or ``OTEL_PYTHON_TRACER_PROVIDER``). Off,
nothing here allocates or adds a header: callers resolve ``tracer()`` once (a publisher when it
connects, a worker's handler when it starts) and test it with one ``is None`` per message.

The context travels as W3C ``traceparent`` (and ``tracestate`` when it is not empty) through
the global propagator (``opentelemetry.propagate``), so a propagator the application installs
(B3, say) is used instead. Every broker carries these as ordinary string headers.

This module sits beneath the backends (the outbox's ``add`` uses it); the consumer side is in
``oncely.runtime._tracing``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the extra ``otel`` is not installed: tracing is off for good
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["created", "describe", "messaging_system", "send", "tracer"]


T = TypeVar("T")

log = logging.getLogger("oncely.tracing")

# OpenTelemetry's well-known ``messaging.system`` values; other schemes name themselves.
_SYSTEMS = {"amqp": "rabbitmq", "amqps": "rabbitmq", "sqs": "aws_sqs", "kafka": "kafka"}

_cached: tuple[object, Tracer] | None = None


def tracer() -> Tracer | None:
    """oncely's tracer, or ``None`` when tracing is off (no API, or no provider set)."""
    global _cached
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    if _cached is None or _cached[0] is not provider:
        _cached = (provider, provider.get_tracer("oncely", _version()))
    return _cached[1]


def _version() -> str | None:
    # Not oncely._version: that module sits above the backends this one serves.
    try:
        return metadata.version("oncely")
    except metadata.PackageNotFoundError:
        return None


def describe(exc: BaseException) -> str:
    """``"Type: message"``, never raising (an exception's ``__str__`` may)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__}: <unprintable>"


def messaging_system(url: str) -> str:
    """``messaging.system`` for a broker URL: ``rabbitmq``, ``aws_sqs``, ``kafka``, or the
    scheme itself (``memory``, ``sqlite``, a third-party broker's)."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    return _SYSTEMS.get(scheme, scheme or "unknown")


def _attributes(system: str | None, topic: str, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.destination.name": topic,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if system is not None:
        attributes["messaging.system"] = system
    return attributes


async def send(
    tracer: Tracer,
    system: str,
    topic: str,
    headers: dict[str, str],
    publish: Callable[[], Awaitable[T]],
    *,
    message_id: str | None = None,
    resume: bool = False,
) -> T:
    """Run ``publish`` in a producer span ``send <topic>`` whose context is injected into
    ``headers`` first (``publish`` must send that same dict). A ``str`` result (or
    ``message_id``) is recorded as ``messaging.message.id``; an exception is recorded and
    re-raised.

    The span is a child of the current span, or with ``resume`` of the context already in
    ``headers`` (the outbox relay: the row's ``create`` span, from the ``add`` that wrote it).
    """
    try:
        parent = propagate.extract(headers) if resume else None
        attributes = _attributes(system, topic, "send")
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        span = tracer.start_span(
            f"send {topic}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
        )
    except Exception:
        _broken()
        return await publish()
    token = None
    try:
        token = context.attach(trace.set_span_in_context(span, parent))
        propagate.inject(headers)
    except Exception:
        _broken()
    try:
        result = await publish()
    except BaseException as exc:
        _ended(span, token, exc)
        raise
    try:
        if isinstance(result, str):
            span.set_attribute("messaging.message.id", result)
    except Exception:
        _broken()
    _ended(span, token, None)
    return result


def _ended(span: Span, token: object, exc: BaseException | None) -> None:
    """Detach the span's context, record ``exc`` on it, end it. Never raises."""
    try:
        if token is not None:
            context.detach(token)  # type: ignore[arg-type]
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, describe(exc)))
        span.end()
    except Exception:
        _broken()


def _broken() -> None:
    """Tracing must never change what happens to a message: a failure in it (a propagator's or
    a span processor's bug) is logged, and the publish goes on."""
    log.warning("tracing failed; the message is published regardless", exc_info=True)


def created(
    topic: str, headers: Mapping[str, str] | None, message_id: str, outbox: str
) -> Mapping[str, str] | None:
    """``headers`` plus the context of a producer span ``create <topic>`` (the outbox's
    ``add``: the message is created now and sent by the relay later, in the same trace), or
    ``headers`` unchanged when tracing is off. ``outbox`` is the database dialect; the broker
    is not known yet, so the span has no ``messaging.system``."""
    t = tracer()
    if t is None:
        return headers
    out = dict(headers or {})
    attributes = _attributes(None, topic, "create")
    attributes["messaging.message.id"] = message_id
    attributes["oncely.outbox"] = outbox
    try:
        with t.start_as_current_span(
            f"create {topic}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            propagate.inject(out)
    except Exception:
        _broken()
        return headers
    return out
