"""SQL and batched writes of the SQLite idempotency store (``oncely.stores.sqlite``).

``begin`` and ``complete`` calls that arrive together are written by one statement each
(``write_begins``, ``write_completes``). One statement is its own transaction, and SQLite takes
the write lock of a writing statement before it reads anything, so a batch is as atomic across
processes as ``BEGIN IMMEDIATE`` around the same work: a claim can never see a row as free that
another process is taking. It costs one thread hop and one commit per batch, where
``BEGIN IMMEDIATE``, read, write and ``COMMIT`` cost four hops per call.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from oncely._batch import copy_error
from oncely.errors import StoreUnavailable
from oncely.stores._key_batch import BeginCall, CompleteCall, Fetch, complete_rounds, new_token
from oncely.stores.base import Begin, Outcome

# ``expires_at`` is when a row may be deleted: a completed row's result ttl, or a running row's
# lease plus the stale grace. One indexed column keeps the purge a range delete.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS oncely_idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'completed')),
        token TEXT,
        lease_until REAL,
        result BLOB,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS oncely_idempotency_expiry ON oncely_idempotency (expires_at)",
)
RENEW = (
    "UPDATE oncely_idempotency SET lease_until = ?, expires_at = ? "
    "WHERE key = ? AND token = ? AND state = 'running'"
)
COMPLETE = (
    "UPDATE oncely_idempotency "
    "SET state = 'completed', token = NULL, lease_until = NULL, result = ?, expires_at = ? "
    "WHERE key = ? AND token = ? AND state = 'running'"
)
OWNED = "SELECT 1 FROM oncely_idempotency WHERE key = ? AND token = ? AND state = 'running'"
RELEASE = "DELETE FROM oncely_idempotency WHERE key = ? AND token = ? AND state = 'running'"
PURGE = "DELETE FROM oncely_idempotency WHERE expires_at <= ?"
PURGE_SOME = (
    "DELETE FROM oncely_idempotency WHERE rowid IN "
    "(SELECT rowid FROM oncely_idempotency WHERE expires_at <= ? LIMIT ?)"
)

BATCH = 128
"""Most calls one statement writes (five parameters each, under SQLite's old 999 limit)."""

CLAIM_ROUNDS = 3
"""How often ``write_begins`` tries a key whose blocking row vanished before it could read it."""

RETRY_SOON = 0.05
"""``retry_after`` for a key found busy ``CLAIM_ROUNDS`` times that was free each time we looked."""


@functools.cache
def claim_sql(n: int) -> str:
    """Take ``n`` keys that are free or expired, one row of parameters each, then ``now``.

    A live row is left alone (the ``DO UPDATE ... WHERE`` is false), so it is not returned;
    tokens are fresh per call, so the returned tokens say exactly which calls got ``NEW``. A
    key twice in one batch is claimed by its first row; the second then meets a live lease.
    """
    rows = ", ".join(["(?, ?, 'running', ?, ?, NULL, ?)"] * n)
    return (
        "INSERT INTO oncely_idempotency "
        "(key, fingerprint, state, token, lease_until, result, expires_at) "
        f"VALUES {rows} ON CONFLICT (key) DO UPDATE SET "
        "fingerprint = excluded.fingerprint, state = 'running', token = excluded.token, "
        "lease_until = excluded.lease_until, result = NULL, expires_at = excluded.expires_at "
        "WHERE CASE state WHEN 'completed' THEN expires_at ELSE lease_until END <= ? "
        "RETURNING token"
    )


@functools.cache
def find_sql(n: int) -> str:
    marks = ",".join("?" * n)
    return (
        "SELECT key, fingerprint, state, lease_until, result, expires_at "
        f"FROM oncely_idempotency WHERE key IN ({marks})"
    )


@functools.cache
def complete_sql(n: int) -> str:
    """Complete ``n`` distinct keys, each only while its token still holds it.

    ``RETURNING`` may only name the updated table, and the token is cleared, so it returns
    the key: callers must not put one key twice in a statement.
    """
    rows = ", ".join(["(?, ?, ?, ?)"] * n)
    return (
        f"WITH done (key, token, result, expires_at) AS (VALUES {rows}) "
        "UPDATE oncely_idempotency SET state = 'completed', token = NULL, lease_until = NULL, "
        "result = done.result, expires_at = done.expires_at FROM done "
        "WHERE oncely_idempotency.key = done.key AND oncely_idempotency.token = done.token "
        "AND oncely_idempotency.state = 'running' RETURNING key"
    )


async def write_begins(
    fetch: Fetch, calls: list[BeginCall], grace: float
) -> list[Begin | Exception]:
    """``begin`` for each call, in as few statements as the common case allows.

    One ``claim_sql`` takes every free or expired key. Only the calls it did not grant read
    the rows that blocked them (``find_sql``) to tell ``IN_PROGRESS``, ``COMPLETED`` and
    ``MISMATCH`` apart. The read is a second statement, so the row may have changed in
    between: classifying what the read saw is still a valid answer, since that state held at
    some moment during the call. But a row that vanished (released, purged) or expired in
    between is free now, and answering ``IN_PROGRESS`` for it could be wrong: the row that
    blocked the claim may have been a completed one whose result we never saw. So such calls
    try the claim again, up to ``CLAIM_ROUNDS`` times. A key that is taken and freed again
    between our two statements every time then answers ``IN_PROGRESS`` with ``RETRY_SOON``:
    it was busy each time we tried, and the caller only retries a little later.

    A statement that fails committed nothing, so its error goes to exactly the calls not yet
    answered; calls granted by an earlier statement keep their ``NEW``.
    """
    outcomes: list[Begin | Exception | None] = [None] * len(calls)
    todo = list(range(len(calls)))
    try:
        for _ in range(CLAIM_ROUNDS):
            now = time.time()
            tokens = [new_token() for _ in todo]
            params: list[Any] = []
            for i, token in zip(todo, tokens, strict=True):
                until = now + calls[i].lease
                params += (calls[i].key, calls[i].fingerprint, token, until, until + grace)
            params.append(now)
            granted = {row[0] for row in await fetch(claim_sql(len(todo)), tuple(params))}
            blocked = []
            for i, token in zip(todo, tokens, strict=True):
                if token in granted:
                    outcomes[i] = Begin(Outcome.NEW, token=token)
                else:
                    blocked.append(i)
            todo = []
            if not blocked:
                break
            keys = tuple(dict.fromkeys(calls[i].key for i in blocked))
            found = {row[0]: row for row in await fetch(find_sql(len(keys)), keys)}
            now = time.time()
            for i in blocked:
                row = found.get(calls[i].key)
                outcome = None if row is None else classify(row, calls[i].fingerprint, now)
                if outcome is None:
                    todo.append(i)
                else:
                    outcomes[i] = outcome
            if not todo:
                break
    except StoreUnavailable as exc:
        return [copy_error(exc) if o is None else o for o in outcomes]
    busy = Begin(Outcome.IN_PROGRESS, retry_after=RETRY_SOON)
    return [busy if o is None else o for o in outcomes]


async def write_completes(fetch: Fetch, calls: list[CompleteCall]) -> list[Exception | None]:
    """``complete`` for each call, one statement per round (see ``complete_rounds``)."""

    async def write_round(batch: list[CompleteCall]) -> set[str]:
        now = time.time()
        params: list[Any] = []
        for key, token, result, ttl in batch:
            params += (key, token, result, now + ttl)
        return {row[0] for row in await fetch(complete_sql(len(batch)), tuple(params))}

    return await complete_rounds(calls, write_round)


def classify(row: Any, fingerprint: str, now: float) -> Begin | None:
    """The outcome for an existing ``find_sql`` row, or ``None`` if it expired and may be
    taken."""
    _, found_fingerprint, state, lease_until, result, expires_at = row
    if state == "completed":
        if expires_at <= now:
            return None
        if found_fingerprint != fingerprint:
            return Begin(Outcome.MISMATCH)
        return Begin(Outcome.COMPLETED, result=None if result is None else bytes(result))
    if lease_until <= now:
        return None
    if found_fingerprint != fingerprint:
        return Begin(Outcome.MISMATCH)
    return Begin(Outcome.IN_PROGRESS, retry_after=lease_until - now)
