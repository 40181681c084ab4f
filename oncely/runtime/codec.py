"""Payload encoding and typed decoding with msgspec.

Bodies are JSON, except that a ``bytes`` payload travels as-is and a handler annotated with
``bytes`` receives the raw body. A handler's first parameter annotation picks the decode type:
a ``msgspec.Struct``, ``dict``, ``list``, a dataclass, ``str``, ``int``, ... or nothing (``Any``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from oncely._codec import encode
from oncely.errors import DecodeError

__all__ = ["Decoder", "encode", "fingerprint"]


_FRESH = hashlib.blake2b(digest_size=16)
"""A blake2b state with nothing hashed yet, copied per body: ``copy()`` then ``update()`` is
the same digest as ``blake2b(body, digest_size=16)``, without parsing the keyword arguments
and setting up the parameter block each time (3.4 k instructions a body against 4.7 k)."""


def fingerprint(body: bytes) -> str:
    """A stable digest of a body, to catch a key reused with a different payload.

    Stores keep it with every key: it must never change (blake2b, 16 bytes, hex), or every key
    stored before would read as reused with a different payload."""
    digest = _FRESH.copy()
    digest.update(body)
    return digest.hexdigest()


class Decoder:
    """Decodes bodies into one type, built once per handler (msgspec caches the schema)."""

    __slots__ = ("_decoder", "type")

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._decoder: msgspec.json.Decoder[Any] | None = (
            None if type_ is bytes else msgspec.json.Decoder(type_)
        )

    def decode(self, body: bytes) -> Any:
        """Decode ``body``.

        Raises:
            DecodeError: the body is not valid JSON or does not match the type; the message
                says where (msgspec's path, e.g. ``$.items[0].qty``).
        """
        if self._decoder is None:
            return body
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise DecodeError(str(exc)) from exc
