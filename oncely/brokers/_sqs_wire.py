"""SQS wire details for ``SqsBroker``: queue names and message encoding (its errors are in
``_sqs_errors``)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from oncely.brokers._sqs_options import SqsOptions
from oncely.brokers.base import Headers
from oncely.errors import (
    ConfigError,
    PublishFailed,
)

if TYPE_CHECKING:
    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueOutputTypeDef,
        MessageAttributeValueTypeDef,
        MessageTypeDef,
    )

log = logging.getLogger("oncely.brokers.sqs")

MAX_ATTRIBUTES = 10
"""SQS accepts at most 10 message attributes per message."""
RESERVED_ATTRIBUTES = 3
"""Kept free for the three attributes a dead letter gains (``oncely-dead-letter-reason``,
``oncely-attempt``, ``oncely-dead-lettered-at``); ``oncely-message-id`` is always sent."""
MAX_VISIBILITY = 43_200
"""12 hours: the longest a message may stay invisible, counted from its receive."""
MAX_PUBLISH_DELAY = 900
"""``DelaySeconds`` is at most 15 minutes."""
ENCODING = "oncely-body-encoding"
"""``base64`` when the body is not valid SQS text (binary, control characters), ``empty`` for
an empty body (SQS refuses one; ``-`` is sent)."""
PACKED = "oncely-headers"
"""Headers packed into one JSON attribute when a dead letter would exceed 10 attributes."""
DLQ_SUFFIX = "-dlq"

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_ATTRIBUTE_NAME = re.compile(r"^(?!\.)(?!.*\.\.)(?!.*\.$)[A-Za-z0-9_.-]{1,256}$")
# Characters SQS accepts in a body or a String attribute (XML 1.0 minus the surrogates).
_INVALID_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ID_CHARS = re.compile(r"^[!-~]{1,128}$")


# ------------------------------------------------------------------------------ queue names


def is_fifo(topic: str, options: SqsOptions) -> bool:
    return options.fifo or topic.endswith(".fifo")


def queue_name(topic: str, options: SqsOptions) -> str:
    """``<prefix><topic>``, with ``.fifo`` appended for FIFO topics that lack it."""
    base = topic.removesuffix(".fifo")
    name = options.prefix + base
    if not _NAME.match(name) or len(name) > 80 - len(DLQ_SUFFIX) - 5:
        raise ConfigError(
            f"SQS queue name {name!r} (from topic {topic!r}) must be 1-{75 - len(DLQ_SUFFIX)} "
            "letters, digits, - or _ (plus an optional .fifo suffix)"
        )
    return name + ".fifo" if is_fifo(topic, options) else name


def dlq_name(topic: str, options: SqsOptions) -> str:
    """The dead-letter queue: ``<prefix><topic>-dlq`` (``-dlq.fifo`` for FIFO topics)."""
    name = queue_name(topic, options)
    if name.endswith(".fifo"):
        return name.removesuffix(".fifo") + DLQ_SUFFIX + ".fifo"
    return name + DLQ_SUFFIX


def fifo_id(value: str) -> str:
    """A valid ``MessageGroupId``/``MessageDeduplicationId``: the value itself when SQS takes
    it (1-128 printable ASCII), else its SHA-256."""
    if _ID_CHARS.match(value):
        return value
    return hashlib.sha256(value.encode()).hexdigest()


# ------------------------------------------------------------------------- message encoding


@dataclass(slots=True)
class Outgoing:
    """A message ready for ``SendMessage(Batch)``: its text body and attributes."""

    id: str
    body: str
    attributes: dict[str, MessageAttributeValueTypeDef]
    size: int


def encode(
    message_id: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_size: int,
    reserve: int = RESERVED_ATTRIBUTES,
) -> Outgoing:
    """Turn body and headers into an SQS message, or fail without sending anything.

    The body travels as UTF-8 text when SQS accepts it as is (a JSON payload stays readable
    by any consumer); otherwise base64 with ``oncely-body-encoding=base64``.

    Raises:
        PublishFailed: more headers than fit in SQS's 10 attributes (after ``reserve``), a
            header name or value SQS refuses, a header named like the adapter's own
            ``oncely-body-encoding`` or ``oncely-headers``, or a message over ``max_size``
            bytes.
    """
    attributes: dict[str, MessageAttributeValueTypeDef] = {}
    for name, value in headers.items():
        if name in (ENCODING, PACKED):
            raise PublishFailed(
                f"header {name!r} is reserved by the SQS adapter (it tells consumers how to "
                "decode the message); rename it"
            )
        if not _ATTRIBUTE_NAME.match(name) or name.lower().startswith(("aws.", "amazon.")):
            raise PublishFailed(
                f"header name {name!r} is not a valid SQS message attribute name "
                "(1-256 of A-Z a-z 0-9 _ - ., no leading/trailing/double dot, no AWS./Amazon.)"
            )
        if value == "" or _INVALID_TEXT.search(value):
            raise PublishFailed(
                f"header {name!r} has a value SQS cannot carry (empty, or control characters)"
            )
        attributes[name] = {"DataType": "String", "StringValue": value}
    attributes[Headers.MESSAGE_ID] = {"DataType": "String", "StringValue": message_id}
    try:
        text = body.decode("utf-8")
        ok = not _INVALID_TEXT.search(text)
    except UnicodeDecodeError:
        ok = False
    if not body:
        # SQS refuses an empty body.
        text = "-"
        attributes[ENCODING] = {"DataType": "String", "StringValue": "empty"}
    elif not ok:
        text = base64.b64encode(body).decode("ascii")
        attributes[ENCODING] = {"DataType": "String", "StringValue": "base64"}
    limit = MAX_ATTRIBUTES - reserve
    if len(attributes) > limit:
        own = sorted(k for k in attributes if k not in (Headers.MESSAGE_ID, ENCODING))
        raise PublishFailed(
            f"too many headers for SQS: a message carries at most {MAX_ATTRIBUTES} message "
            f"attributes and oncely needs {len(attributes) - len(own) + reserve} of them "
            f"({Headers.MESSAGE_ID}{', ' + ENCODING if ENCODING in attributes else ''}"
            f"{' and ' + str(reserve) + ' reserved for dead-lettering' if reserve else ''}), "
            f"so at most {limit - (len(attributes) - len(own))} headers fit; got {len(own)}: "
            f"{', '.join(own)}"
        )
    size = message_size(text, attributes)
    if size > max_size:
        raise PublishFailed(
            f"message {message_id} is {size} bytes as SQS counts them (body "
            f"{'base64-encoded ' if ENCODING in attributes else ''}plus attributes); the limit "
            f"is {max_size} bytes (max_message_size); it was not sent"
        )
    return Outgoing(message_id, text, attributes, size)


def copy_attributes(
    attributes: Mapping[str, MessageAttributeValueOutputTypeDef],
) -> dict[str, MessageAttributeValueTypeDef]:
    """Received message attributes, in the shape a send takes."""
    out: dict[str, MessageAttributeValueTypeDef] = {}
    for name, value in attributes.items():
        if "BinaryValue" in value:
            out[name] = {"DataType": value["DataType"], "BinaryValue": value["BinaryValue"]}
        else:
            out[name] = {"DataType": value["DataType"], "StringValue": value.get("StringValue", "")}
    return out


def text_value(value: str) -> str:
    """``value`` with the characters SQS refuses in an attribute replaced by ``?``."""
    return _INVALID_TEXT.sub("?", value)


def message_size(body: str, attributes: Mapping[str, MessageAttributeValueTypeDef]) -> int:
    """The size SQS counts: the body plus each attribute's name, type and value, in bytes."""
    size = len(body.encode("utf-8"))
    for name, value in attributes.items():
        size += len(name.encode()) + len(value["DataType"].encode())
        size += len(value.get("StringValue", "").encode())
        binary = value.get("BinaryValue")
        if isinstance(binary, bytes):
            size += len(binary)
    return size


class Incoming(NamedTuple):
    """What ``decode`` takes from a received SQS message (a tuple: one per message, and the
    delivery unpacks it)."""

    id: str
    body: bytes
    headers: dict[str, str]
    attempt: int
    sent_at: float
    group: str | None


def decode(message: MessageTypeDef) -> Incoming:
    """Read a received message, oncely's or a plain client's.

    The id is ``oncely-message-id``, else the SQS ``MessageId``; the attempt is
    ``ApproximateReceiveCount``. String and Number attributes become headers; a Binary one
    becomes its base64 text.
    """
    attributes = message.get("MessageAttributes")
    headers = decode_headers(attributes) if attributes else {}
    encoding = headers.pop(ENCODING, None)
    system = message.get("Attributes") or {}
    id_ = headers.get(Headers.MESSAGE_ID) or message.get("MessageId", "")
    # tuple.__new__ rather than Incoming(...): the generated __new__ is a Python call.
    return _new_tuple(
        Incoming,
        (
            id_,
            decode_body(message.get("Body", ""), encoding, id_),
            headers,
            int(system.get("ApproximateReceiveCount", "1")),
            int(system.get("SentTimestamp", "0")) / 1000,
            system.get("MessageGroupId"),
        ),
    )


def attribute_text(value: MessageAttributeValueOutputTypeDef) -> str | None:
    """A received attribute as a header value: its ``StringValue``, else its ``BinaryValue``
    as base64 text, else ``None``."""
    string = value.get("StringValue")
    if string is not None:
        return string
    if "BinaryValue" in value:
        return base64.b64encode(value["BinaryValue"]).decode("ascii")
    return None


def decode_headers(attributes: Mapping[str, MessageAttributeValueOutputTypeDef]) -> dict[str, str]:
    """The headers a message's attributes carry (``oncely-body-encoding`` included; ``decode``
    pops it), with packed ``oncely-headers`` unpacked."""
    headers: dict[str, str] = {}
    for name, value in attributes.items():
        text = attribute_text(value)
        if text is not None:
            headers[name] = text
    packed = headers.pop(PACKED, None)
    if packed is not None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            headers.update({str(k): str(v) for k, v in json.loads(packed).items()})
    return headers


def decode_body(text: str, encoding: str | None, message_id: str) -> bytes:
    """The body bytes from a received body's text and its ``oncely-body-encoding``.

    A body that the encoding does not fit (a plain client's, marked base64 but not base64)
    is its text, as with an encoding oncely does not know, and a warning names the message:
    raising here would fail the whole receive (the poller, or ``oncely dlq list``) over one
    message, again at each redelivery.
    """
    if encoding is None:
        return text.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(text)
        except ValueError as exc:  # binascii.Error
            log.warning(
                "SQS message %s: its oncely-body-encoding says base64 but its body is not "
                "base64 (%s); the body is handed on as its UTF-8 text",
                message_id,
                exc,
            )
            return text.encode("utf-8")
    if encoding == "empty":
        return b""
    return text.encode("utf-8")


_new_tuple = tuple.__new__
