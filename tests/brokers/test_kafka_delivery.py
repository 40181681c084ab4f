"""A Kafka delivery built from a consumed record, without a broker: its identity, key and
headers (decoded only when read) are those an eager decoding of every header gives (below, as
the adapter decoded them before it went lazy), whatever the record's headers hold."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from oncely.brokers._kafka_delivery import KafkaDelivery
from oncely.brokers._kafka_track import PartitionTrack

Raw = tuple[tuple[str, bytes | None], ...]


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def record_headers(record: Any) -> dict[str, str]:
    """Every header as text, UTF-8 or else latin-1, the last of a repeated name winning, the
    retry machinery's ``oncely-due`` left out."""
    out = {name: _text(value) for name, value in record.headers}
    out.pop("oncely-due", None)
    return out


def record_identity(record: Any, headers: dict[str, str]) -> tuple[str, int, float]:
    """(id, attempt, enqueued_at): oncely's headers where present and valid, else the
    record's coordinates, attempt 1 and its timestamp."""
    mid = headers.get("oncely-message-id") or f"{record.topic}/{record.partition}/{record.offset}"
    try:
        attempt = max(1, int(headers.get("oncely-attempt", "1")))
    except ValueError:
        attempt = 1
    try:
        enqueued = float(headers["oncely-published-at"])
    except (KeyError, ValueError):
        enqueued = record.timestamp / 1000.0
    return mid, attempt, enqueued


def rec(headers: Raw, *, offset: int = 7, timestamp: int = 1_700_000_000_123) -> Any:
    # A None value is what a plain producer's null header arrives as, whatever the stubs say.
    raw: Any = headers
    return ConsumerRecord("t", 2, offset, timestamp, 0, b"k", b"body", None, 1, 4, raw)


def deliver(record: Any) -> KafkaDelivery:
    track = PartitionTrack(TopicPartition("t", 2), ordering="key")
    return KafkaDelivery(None, track, record, topic="t")  # type: ignore[arg-type]


CASES: dict[str, Raw] = {
    "none": (),
    "oncely's own": (
        ("oncely-key", b"k7"),
        ("oncely-message-id", b"m-1"),
        ("oncely-published-at", b"1795876134.1072931"),
    ),
    "a retry copy": (
        ("oncely-message-id", b"m-2"),
        ("oncely-attempt", b"3"),
        ("oncely-published-at", b"12.5"),
        ("oncely-due", b"99.0"),
        ("x", b"y"),
    ),
    "bad numbers": (("oncely-attempt", b"three"), ("oncely-published-at", b"soon")),
    "attempt below one": (("oncely-attempt", b"-4"),),
    "an empty id and key": (("oncely-message-id", b""), ("oncely-key", b"")),
    "None values": (("oncely-message-id", None), ("oncely-key", None), ("v", None)),
    "not UTF-8": (("oncely-key", b"\xff\xfe"), ("x", b"\xe9t\xe9")),
    "a repeated name, the last wins": (
        ("oncely-message-id", b"first"),
        ("oncely-attempt", b"2"),
        ("oncely-message-id", b"second"),
        ("oncely-attempt", b"5"),
    ),
}


@pytest.mark.parametrize("headers", CASES.values(), ids=list(CASES))
def test_delivery_fields_match_the_eager_decoding(headers: Raw) -> None:
    record = rec(headers)
    expected_headers = record_headers(record)
    mid, attempt, enqueued = record_identity(record, expected_headers)
    delivery = deliver(record)
    assert (delivery.id, delivery.attempt) == (mid, attempt)
    assert delivery.key == expected_headers.get("oncely-key", mid)
    assert delivery.enqueued_at == enqueued
    assert delivery.headers == expected_headers
    assert "oncely-due" not in delivery.headers
    assert delivery.body == b"body" and delivery.topic == "t"


def test_the_coordinates_and_timestamp_stand_in_for_missing_headers() -> None:
    delivery = deliver(rec((), offset=41, timestamp=1_700_000_000_250))
    assert delivery.id == delivery.key == "t/2/41"
    assert delivery.attempt == 1
    assert delivery.enqueued_at == 1_700_000_000.25


def test_headers_and_enqueued_at_can_be_replaced() -> None:
    delivery = deliver(rec((("a", b"1"),)))
    delivery.headers = {"b": "2"}  # what nack(error=) does before building the retry copy
    assert delivery.headers == {"b": "2"}
    delivery.enqueued_at = 5.0
    assert delivery.enqueued_at == 5.0
