"""Payload encoding, below every layer: the runtime's ``Publisher`` and the outbox (a store,
which may not import the runtime) encode payloads by this one rule, so a message reads the
same whichever way it was sent."""

from __future__ import annotations

import msgspec

__all__ = ["encode", "json_encoder"]

json_encoder = msgspec.json.Encoder()
"""One shared encoder (msgspec encoders are reusable and keep no per-call state)."""


def encode(payload: object) -> bytes:
    """Encode a payload for the wire: bytes pass through, anything else becomes JSON.

    Raises:
        TypeError: the payload has a type msgspec cannot encode.
    """
    if type(payload) is bytes:  # the common case, before building a union to check
        return payload
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    try:
        return json_encoder.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"cannot encode payload of type {type(payload).__name__}: {exc}") from exc
