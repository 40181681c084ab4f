"""A received SQS message read lazily by ``SqsDelivery`` gives what the eager ``decode`` does.

The delivery reads only the id, key and body encoding at construction and decodes the headers
on first read; ``_sqs_wire.decode`` (which dead-letter listing and replay use) decodes
everything at once. Both must agree on every message shape, oncely's and plain clients'.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

import pytest

from oncely.brokers._sqs_delivery import SqsDelivery
from oncely.brokers._sqs_wire import decode, encode
from oncely.brokers.base import Headers

if TYPE_CHECKING:
    from oncely.brokers._sqs_link import BrokerLink


class _Sub:
    """The two fields a delivery reads from its subscription at construction."""

    topic = "orders"

    @property
    def broker(self) -> BrokerLink:
        raise AssertionError("not used when decoding")

    def _settled(self, delivery: SqsDelivery, *, returned: bool) -> None:
        raise AssertionError("not used when decoding")


def _string(value: str) -> dict[str, Any]:
    return {"DataType": "String", "StringValue": value}


def _received(out_body: str, attributes: dict[str, Any] | None, **system: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "MessageId": "sqs-id-1",
        "ReceiptHandle": "handle-1",
        "Body": out_body,
        "Attributes": {"ApproximateReceiveCount": "3", "SentTimestamp": "1700000000123", **system},
    }
    if attributes is not None:
        message["MessageAttributes"] = attributes
    return message


def _published(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    out = encode("m-1", body, headers, max_size=262_144)
    return _received(out.body, dict(out.attributes))


MESSAGES = {
    "plain client, no attributes": _received('{"n": 1}', None),
    "plain client, empty attributes": _received("text", {}),
    "oncely, id only": _published(b'{"n": 2}', {}),
    "oncely, key and more": _published(
        b"x", {Headers.KEY: "order-7", Headers.PUBLISHED_AT: "1700000000.5", "trace": "t"}
    ),
    "oncely, empty key": _received(
        "x", {Headers.MESSAGE_ID: _string("m"), Headers.KEY: _string("")}
    ),
    "oncely, binary body": _published(b"\x00\xff\x01", {Headers.KEY: "k"}),
    "oncely, empty body": _published(b"", {}),
    "binary attributes": _received(
        "b",
        {
            Headers.MESSAGE_ID: {"DataType": "Binary", "BinaryValue": b"\x01\x02"},
            Headers.KEY: {"DataType": "Binary", "BinaryValue": b"\x03"},
            "n": {"DataType": "Number", "StringValue": "12"},
        },
    ),
    "attribute with no value": _received("v", {Headers.KEY: {"DataType": "String"}}),
    "unknown encoding": _received("raw", {"oncely-body-encoding": _string("zstd")}),
    "packed dead letter": _received(
        base64.b64encode(b"\x00bin").decode(),
        {
            "oncely-headers": _string(
                json.dumps(
                    {
                        Headers.MESSAGE_ID: "packed-id",
                        Headers.KEY: "packed-key",
                        "oncely-body-encoding": "base64",
                        "h": "v",
                    }
                )
            ),
            Headers.REASON: _string("boom"),
        },
    ),
    "fifo": _received("f", {Headers.MESSAGE_ID: _string("m-f")}, MessageGroupId="g-1"),
}


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_lazy_delivery_fields_match_the_eager_decoding(message: dict[str, Any]) -> None:
    expected = decode(message)  # type: ignore[arg-type]
    delivery = SqsDelivery(_Sub(), "http://q", message, 0.0)  # type: ignore[arg-type]
    assert delivery.id == expected.id
    assert delivery.body == expected.body
    assert delivery.attempt == expected.attempt == 3
    assert delivery.enqueued_at == expected.sent_at
    assert delivery.group == expected.group
    assert delivery.key == expected.headers.get(Headers.KEY, expected.id)
    assert dict(delivery.headers) == expected.headers
    assert delivery.headers is delivery.headers  # decoded once


def test_headers_can_be_replaced() -> None:
    message = _published(b"x", {Headers.KEY: "k"})
    delivery = SqsDelivery(_Sub(), "http://q", message, 0.0)  # type: ignore[arg-type]
    delivery.headers = {"a": "b"}
    assert delivery.headers == {"a": "b"}
