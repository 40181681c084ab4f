"""How large a Kafka record is on the wire, checked before an exactly-once output is queued
(``_kafka_delivery``) and again when its batch is built (``_kafka_burst``)."""

from __future__ import annotations

from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

__all__ = ["MAX_REQUEST", "SURELY_FITS", "oversize"]

MAX_REQUEST = 1_048_576
"""aiokafka's default ``max_request_size``, which oncely's transactional producers keep:
``send`` refuses a larger record before it goes out, and so does ``send_burst``."""


_BATCH_HEADER = 61
"""Bytes of a v2 record batch's header, which a record alone in its batch carries too."""

SURELY_FITS = MAX_REQUEST - 128
"""A ``rough`` sum (see ``oversize``) plus 16 bytes a header below this always fits: the
margin covers the batch header and every length prefix (at most 5 bytes each, 2 a header).
A caller on the hot path checks it itself, sparing the call in the common case."""


def oversize(
    key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], rough: int | None = None
) -> int | None:
    """The size a record alone in its batch would have when serialized, if that is over
    ``MAX_REQUEST`` (``send_burst`` would refuse it, on every replay), else ``None``.

    Checked when the handler produces the output, so the failure is the handler's own: it is
    retried and dead-lettered like any other, where a refusal at commit time fails the
    transaction, which only replays the record with the same attempt, for ever.

    ``rough``, if given, is the sum below, added up by a caller that walked the headers
    already (``len(value) + len(key)``, and ``4 * len(name) + len(data)`` a header).
    """
    if rough is None:
        rough = len(value) + (0 if key is None else len(key))
        for name, data in headers:
            rough += len(name) * 4 + len(data)  # at most 4 UTF-8 bytes a character
    # The common case, far from the limit: nothing to count.
    if rough + 16 * len(headers) < SURELY_FITS:
        return None
    body = 3 + _DefaultRecordBatchBuilderPy.size_of(key, value, list(headers))
    size = _BATCH_HEADER + body + _varint_size(body)
    return size if size > MAX_REQUEST else None


def _varint_size(value: int) -> int:
    value = (value << 1) ^ (value >> 63)  # zigzag
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size
