"""What the outbox's two backends (PostgreSQL, SQLite) share: rows, claims, names, headers.

A backend stores rows in the user's transaction (``add``), and hands the relay batches of rows
it may publish (``claim``), each of which the relay settles once (``Claim.finish``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from oncely._codec import json_encoder
from oncely.brokers.base import check_headers
from oncely.errors import ConfigError

__all__ = [
    "DEFAULT_TABLE",
    "MISSING_TABLE",
    "Backend",
    "Claim",
    "Failure",
    "Row",
    "backoff",
    "check_table",
    "decode_headers",
    "encode_headers",
    "to_row",
]

DEFAULT_TABLE = "oncely_outbox"
MISSING_TABLE = "create the outbox table first (await outbox.migrate())"
"""The hint both backends add to the ``ConfigError`` for a missing table."""

# Lower-case identifiers only: they need no quoting, fold the same in every tool, and the
# whole name doubles as the LISTEN channel (at most 63 bytes in PostgreSQL).
_TABLE = re.compile(r"^(?:[a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*$")
_MAX_TABLE = 50  # leaves room for the index-name suffixes within 63 bytes

_headers_decoder = msgspec.json.Decoder(dict[str, str])


def check_table(name: str) -> str:
    """Validate an outbox table name (``name`` or ``schema.name``, lower-case)."""
    if not isinstance(name, str) or not _TABLE.match(name) or len(name) > _MAX_TABLE:
        raise ConfigError(
            f"bad outbox table name {name!r}: use lower-case letters, digits and _ "
            f"(optionally schema.table), at most {_MAX_TABLE} characters"
        )
    return name


def encode_headers(headers: Mapping[str, str] | None) -> str:
    """Check (``str`` to ``str``) and encode headers as a JSON object."""
    return json_encoder.encode(check_headers(headers)).decode()


def decode_headers(text: str | bytes) -> dict[str, str]:
    return _headers_decoder.decode(text)


@dataclass(frozen=True, slots=True)
class Row:
    """One outbox row, as a claim hands it to the relay."""

    id: int
    message_id: str
    topic: str
    key: str | None
    headers: dict[str, str]
    body: bytes
    attempts: int
    created_at: float
    error: str | None = None
    """Why the row cannot be published as stored (the relay records it as a failed try)."""


def to_row(r: Any) -> Row:
    """A ``Row`` from a record of the claim's columns, in ``Row``'s field order (headers as
    JSON text). Headers that do not decode (a row written around ``add``) make a row with an
    ``error`` rather than an exception: one such row must not fail every claim after it."""
    error = None
    try:
        headers = decode_headers(r[4])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        headers, error = {}, f"undecodable headers (a JSON object of strings is needed): {exc}"
    return Row(
        id=r[0],
        message_id=r[1],
        topic=r[2],
        key=r[3],
        headers=headers,
        body=r[5],
        attempts=r[6],
        created_at=r[7],
        error=error,
    )


@dataclass(frozen=True, slots=True)
class Failure:
    """A row whose publish failed: it stays unsent and becomes claimable after ``delay``."""

    id: int
    error: str
    delay: float


class Claim(abc.ABC):
    """A batch of rows this relay may publish now, held until ``finish`` or ``abandon``.

    ``rows`` are in id order, and for every key they are the oldest unsent rows of that key
    (a prefix of the key's queue), so publishing each key's rows in this order, one after the
    other, keeps per-key order. ``withheld`` counts rows claimed but left alone because an
    older row of their key was held elsewhere; they stay unsent.
    """

    rows: list[Row]
    withheld: int

    @abc.abstractmethod
    async def finish(self, sent: list[int], failed: list[Failure]) -> None:
        """Mark ``sent`` rows sent and record ``failed`` ones; release the rest unsent.

        Rows that are in neither list (not attempted) become claimable again at once, behind
        any failed row of their key.

        Raises:
            StoreUnavailable, StoreError: the outcome is unknown; unmarked rows are published
                again later (the consumer's store absorbs the duplicates).
        """

    @abc.abstractmethod
    async def abandon(self) -> None:
        """Release every row unsent (the relay is stopping or failed). Never raises."""


class Backend(abc.ABC):
    """One database dialect. Constructors do no I/O."""

    url: str
    """The database URL, password masked."""
    table: str
    dialect: str
    max_claim_idle: float | None = None
    """Seconds a claim may go without a statement while its batch publishes, if the database
    bounds it (PostgreSQL: below the relay session's ``idle_in_transaction_session_timeout``);
    the relay refuses a ``publish_timeout`` that could take longer."""

    @abc.abstractmethod
    def schema(self) -> list[str]:
        """The DDL ``migrate`` runs (idempotent ``CREATE ... IF NOT EXISTS`` statements)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True between ``connect`` and ``aclose``."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the backend's own connections (for the relay) and migrate. Idempotent."""

    @abc.abstractmethod
    async def migrate(self) -> None:
        """Create the table and its indexes if missing, on a connection of its own."""

    @abc.abstractmethod
    async def add(
        self,
        conn: Any,
        *,
        message_id: str,
        topic: str,
        key: str | None,
        headers: str,
        body: bytes,
    ) -> None:
        """Insert one row through the user's connection, inside whatever transaction it has."""

    @abc.abstractmethod
    async def claim(self, limit: int, lease: float) -> Claim:
        """Claim up to ``limit`` publishable rows; see ``Claim``. ``lease`` bounds how long a
        claim survives a relay that stopped answering, where the backend needs a lease."""

    @abc.abstractmethod
    async def purge(self, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` rows sent more than ``older_than`` seconds ago; return how
        many. Unsent rows are never deleted."""

    @abc.abstractmethod
    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever rows may have been added; run until cancelled."""

    @abc.abstractmethod
    async def pending(self) -> int:
        """How many rows are not sent yet."""

    async def backlog(self) -> tuple[int, float | None]:
        """How many rows are not sent yet, and the Unix time the oldest of them was added
        (``None`` when there are none, or the backend cannot tell)."""
        return await self.pending(), None

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the backend's connections. Idempotent."""


def backoff(attempts: int, base: float, cap: float) -> float:
    """Exponential delay before the next try after ``attempts`` failed tries (1, 2, ...)."""
    return float(min(cap, base * 2 ** min(max(attempts - 1, 0), 30)))
