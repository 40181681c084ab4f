"""How an AMQP message maps to oncely's view of it and back: the properties of a (re)publish,
and the id, ``str`` headers, attempt and enqueue time read from a delivered message. On the
consume path for every message (``parse_props``), and on every republish (retry, dead letter,
replay)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pamqp.commands import Basic

from oncely.brokers.base import Headers

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage
    from pamqp.common import FieldTable, FieldValue

# Broker bookkeeping added on every dead-lettering (our delay buckets included); it is not the
# publisher's and is not copied on republish.
_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


def properties(
    message_id: str,
    headers: FieldTable,
    published_at: float,
    template: Basic.Properties | None = None,
) -> Basic.Properties:
    """Persistent properties for a (re)publish, keeping the template's descriptive fields."""
    t = template
    stamp = t.timestamp if t is not None and t.timestamp is not None else None
    return Basic.Properties(
        content_type=t.content_type if t else None,
        content_encoding=t.content_encoding if t else None,
        headers=headers,
        delivery_mode=2,
        priority=t.priority or None if t else None,
        correlation_id=t.correlation_id if t else None,
        reply_to=t.reply_to if t else None,
        message_id=message_id,
        timestamp=stamp or datetime.fromtimestamp(int(published_at), tz=UTC),
        message_type=t.message_type if t else None,
        app_id=t.app_id if t else None,
    )


def props_of(message: AbstractIncomingMessage) -> Basic.Properties:
    """The AMQP properties of an aio-pika message (``basic.get``, or a consumer callback)."""
    return Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=message.headers,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.type,
        app_id=message.app_id,
    )


def text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def own_headers(raw: Mapping[str, FieldValue] | None) -> FieldTable:
    """The message's headers minus the broker's dead-lettering bookkeeping."""
    return {k: v for k, v in (raw or {}).items() if not k.startswith(_DEATH_HEADERS)}


@dataclass(slots=True)
class Parsed:
    id: str
    headers: dict[str, str]
    attempt: int
    enqueued_at: float


def parse(message: AbstractIncomingMessage) -> Parsed:
    """``parse_props`` of an aio-pika message."""
    return parse_props(props_of(message), message.body, bool(message.redelivered))


def parse_props(props: Basic.Properties, body: bytes, redelivered: bool) -> Parsed:
    """Read oncely's view of an AMQP message: id, ``str`` headers, attempt, enqueued_at.

    ``id``: ``oncely-message-id``, else the AMQP ``message_id``, else ``sha256:`` + the body's
    SHA-256 (the broker redelivers the same body and properties, so each is stable across
    redeliveries; two plain messages with identical bodies and no ``message_id`` share it).
    ``attempt``: ``oncely-attempt`` (deliveries before the last republish) + 1, plus the quorum
    queue's ``x-delivery-count`` when present, else + 1 when ``redelivered`` is set.
    ``enqueued_at``: ``oncely-published-at``, else the AMQP ``timestamp``, else now.

    On the consume path for every message: oncely's own headers are ``str`` already, so the
    common case costs one pass over the headers and no conversion.
    """
    raw = props.headers or {}
    headers: dict[str, str] = {}
    count: object = None
    for k, v in raw.items():
        if k.startswith(_DEATH_HEADERS):
            continue
        if k == "x-delivery-count":
            count = v
        headers[k] = v if type(v) is str else text(v)
    mid = headers.get(Headers.MESSAGE_ID) or props.message_id
    if not mid:
        mid = "sha256:" + hashlib.sha256(body).hexdigest()
    attempt = _int(headers.get(Headers.ATTEMPT)) + 1
    if isinstance(count, int) and count > 0:
        attempt += count
    elif redelivered:
        attempt += 1
    enqueued_at = _float(headers.get(Headers.PUBLISHED_AT))
    if enqueued_at is None:
        stamp = props.timestamp
        enqueued_at = stamp.timestamp() if stamp is not None else time.time()
    return Parsed(mid, headers, attempt, enqueued_at)


def _int(value: str | None) -> int:
    try:
        return max(int(value), 0) if value is not None else 0
    except ValueError:
        return 0


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
