"""SQL and row helpers of the SQLite broker (``oncely.brokers.sqlite``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from oncely._batch import GroupCommit
from oncely.brokers.base import DeadLetter, Headers

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS oncely_messages (
        id INTEGER PRIMARY KEY,
        msg_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        body BLOB NOT NULL,
        headers TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        visible_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        claim_token TEXT,
        UNIQUE (topic, msg_id)
    )""",
    "CREATE INDEX IF NOT EXISTS oncely_messages_ready ON oncely_messages (topic, visible_at)",
    """CREATE TABLE IF NOT EXISTS oncely_dead_letters (
        id INTEGER PRIMARY KEY,
        msg_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        body BLOB NOT NULL,
        headers TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        attempts INTEGER NOT NULL,
        reason TEXT NOT NULL,
        failed_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS oncely_dead_letters_topic ON oncely_dead_letters (topic, id)",
)

PUBLISH = (
    "INSERT INTO oncely_messages (msg_id, topic, body, headers, enqueued_at, visible_at, attempts)"
    " VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (topic, msg_id) DO NOTHING"
)

# One statement: the write lock is taken before the subquery reads, so concurrent claimers
# (tasks or processes) serialise here and never both see a row as free. The token is unique
# per row and claim: a per-claim prefix plus the row id.
CLAIM = """
UPDATE oncely_messages
SET visible_at = ?1, claim_token = ?2 || id, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM oncely_messages
    WHERE topic = ?3 AND visible_at <= ?4
    ORDER BY visible_at, id
    LIMIT ?5
)
RETURNING id, msg_id, body, headers, enqueued_at, attempts, claim_token
"""

NEXT_VISIBLE = "SELECT MIN(visible_at) FROM oncely_messages WHERE topic = ?"
BACKLOG = "SELECT count(*) FROM oncely_messages WHERE topic = ? AND visible_at <= ?"

RELEASE = (
    "UPDATE oncely_messages SET visible_at = ?, claim_token = NULL, attempts = attempts - 1"
    " WHERE id = ? AND claim_token = ?"
)

NACK = (
    "UPDATE oncely_messages SET visible_at = ?, claim_token = NULL WHERE id = ? AND claim_token = ?"
)

# A deferral: the next claim counts the same attempt again.
NACK_DEFER = (
    "UPDATE oncely_messages SET visible_at = ?, claim_token = NULL, attempts = attempts - 1"
    " WHERE id = ? AND claim_token = ?"
)

# A failed attempt's nack also records its error in the headers (Delivery.nack(error=)).
NACK_ERROR = (
    "UPDATE oncely_messages SET headers = ?, visible_at = ?, claim_token = NULL"
    " WHERE id = ? AND claim_token = ?"
)

NACK_ERROR_DEFER = (
    "UPDATE oncely_messages SET headers = ?, visible_at = ?, claim_token = NULL,"
    " attempts = attempts - 1 WHERE id = ? AND claim_token = ?"
)

EXTEND = "UPDATE oncely_messages SET visible_at = ? WHERE id = ? AND claim_token = ?"

TAKE_FOR_DEAD = (
    "DELETE FROM oncely_messages WHERE id = ? AND claim_token = ?"
    " RETURNING msg_id, topic, body, headers, enqueued_at, attempts"
)

INSERT_DEAD = (
    "INSERT INTO oncely_dead_letters"
    " (msg_id, topic, body, headers, enqueued_at, attempts, reason, failed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

READ_DEAD = (
    "SELECT msg_id, body, headers, attempts, reason, failed_at FROM oncely_dead_letters"
    " WHERE topic = ? ORDER BY id LIMIT ?"
)

READ_DEAD_FOR_REPLAY = (
    "SELECT id, msg_id, body, headers, enqueued_at FROM oncely_dead_letters"
    " WHERE {where} ORDER BY id"
)

DELETE_DEAD = "DELETE FROM oncely_dead_letters WHERE id = ?"

PURGE_DEAD = "DELETE FROM oncely_dead_letters WHERE topic = ? AND failed_at < ?"

ACK_BATCH = 400
"""Most acks deleted by one statement (two parameters each, well under SQLite's limit)."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, str])


def ack_sql(n: int) -> str:
    """``DELETE`` of ``n`` claimed rows, each only if it still carries its claim token.

    Tokens are unique per row and claim, so matching ``id IN (...) AND claim_token IN (...)``
    deletes exactly the rows whose own token is in the batch.
    """
    marks = ",".join("?" * n)
    return (
        f"DELETE FROM oncely_messages WHERE id IN ({marks}) AND claim_token IN ({marks})"
        " RETURNING claim_token"
    )


class AckBatcher:
    """Group commit for acks: acks that arrive while a batch is being written share the next
    statement, so many concurrent handlers cost one commit instead of one each, while every
    ``ack`` still waits for its own row's outcome.

    Args:
        fetch: runs one statement under the connection lock and returns its rows.
    """

    def __init__(self, fetch: Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]]) -> None:
        self._fetch = fetch
        self._commit: GroupCommit[tuple[int, str], bool] = GroupCommit(self._write, limit=ACK_BATCH)

    async def ack(self, rowid: int, token: str) -> bool:
        """Delete the row if it still carries ``token``; True if it did.

        Raises:
            ConnectionLost: the batch could not be written; the outcome is unknown.
        """
        return await self._commit.submit((rowid, token))

    async def drain(self) -> None:
        """Wait until every queued ack has been written (or failed)."""
        await self._commit.drain()

    async def _write(self, batch: list[tuple[int, str]]) -> list[bool | Exception]:
        params = tuple(rowid for rowid, _ in batch) + tuple(token for _, token in batch)
        deleted = {row[0] for row in await self._fetch(ack_sql(len(batch)), params)}
        return [token in deleted for _, token in batch]


def to_json(value: Any) -> str:
    return _encoder.encode(value).decode()


def decode_headers(text: str) -> dict[str, str]:
    return {} if text == "{}" else _decoder.decode(text)


def dead_letter(topic: str, row: tuple[Any, ...]) -> DeadLetter:
    mid, body, headers, attempts, reason, failed_at = row
    return DeadLetter(
        id=mid,
        topic=topic,
        body=body,
        headers={
            **decode_headers(headers),
            Headers.REASON: reason,
            Headers.ATTEMPT: str(attempts),
            Headers.FAILED_AT: repr(failed_at),
        },
        reason=reason,
        attempt=attempts,
        failed_at=failed_at,
    )
