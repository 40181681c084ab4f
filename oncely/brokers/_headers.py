"""The headers oncely reads and writes, and how an error or a header map is made fit to travel
with a message. Part of the broker contract (``oncely.brokers.base`` re-exports all of it)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ERROR_LIMIT",
    "REASON_LIMIT",
    "Headers",
    "check_headers",
    "clip_error",
    "error_headers",
]


class Headers:
    """Names of the headers oncely reads and writes. Other headers pass through untouched."""

    KEY = "oncely-key"
    """The idempotency key a publisher chose; brokers that order by key (Kafka's record key,
    SQS FIFO's group) also group by it."""
    DEDUPE_KEY = "oncely-dedupe-key"
    """The idempotency key where it differs from ``oncely-key``: the outbox sets it to each
    row's message id, because one ordering key spans many distinct messages. The default key
    source (``auto``) reads it first."""
    MESSAGE_ID = "oncely-message-id"
    """The stable message id, for brokers whose own id changes on redelivery."""
    ATTEMPT = "oncely-attempt"
    """The delivery count, for brokers that carry it in the message (AMQP retry path)."""
    PUBLISHED_AT = "oncely-published-at"
    """Unix time of the first publish, as a decimal string."""
    REASON = "oncely-dead-letter-reason"
    """Why a message was dead-lettered."""
    FAILED_AT = "oncely-dead-lettered-at"
    """Unix time at which a message was dead-lettered."""
    FIRST_ERROR = "oncely-first-error"
    """The error of a message's first failed attempt, where the broker carries errors
    (``Capabilities.carries_errors``); set once, by the first ``nack(error=)``."""
    LAST_ERROR = "oncely-last-error"
    """The error of a message's latest failed attempt, where the broker carries errors."""
    REPLAYED_AT = "oncely-replayed-at"
    """Unix time at which a dead letter was last replayed (``DeadLetterAdmin.replay``)."""
    REPLAY_COUNT = "oncely-replay-count"
    """How many times a message has been replayed from its dead-letter queue."""


ERROR_LIMIT = 1000
"""Most characters of an error a header carries (``error_headers``); headers travel with every
redelivery, and brokers bound their size (SQS attributes, AMQP frames)."""


REASON_LIMIT = 4 * ERROR_LIMIT
"""Most characters of a dead-letter reason the runtime sends (``clip_error``): a huge exception
message (an HTTP error quoting a response body) must not make the reject itself fail, as it
does past an AMQP frame (128 KiB), an SQS message (256 KiB) or a Kafka record (1 MiB), and
come back for ever."""


def clip_error(text: str, limit: int = ERROR_LIMIT, *, tail: int = 0) -> str:
    """``text`` fit for a header: encodable as UTF-8 (a lone surrogate, as in text decoded with
    ``surrogateescape``, becomes ``\\udcff``; every broker's driver refuses it otherwise) and at
    most ``limit`` characters, cut at the end, or with ``tail`` in the middle so that the last
    ``tail`` characters stay; the cut is marked ``…``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    tail = min(tail, limit // 2)
    return text[: limit - 1 - tail] + "…" + (text[len(text) - tail :] if tail else "")


def error_headers(headers: Mapping[str, str], error: str) -> dict[str, str]:
    """A copy of ``headers`` with ``error`` recorded for a nack (``Delivery.nack(error=)``):
    ``oncely-last-error`` set, ``oncely-first-error`` set only if absent, each clipped to
    ``ERROR_LIMIT`` characters by ``clip_error``."""
    error = clip_error(error)
    out = dict(headers)
    out.setdefault(Headers.FIRST_ERROR, error)
    out[Headers.LAST_ERROR] = error
    return out


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Copy and check a headers mapping: keys and values must be ``str``."""
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"headers must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return out
