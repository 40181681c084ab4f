"""SQL and batched writes of the PostgreSQL idempotency store (``oncely.stores.postgres``).

Every transition is one statement and reads the database clock (``statement_timestamp()``, the
same instant for every row of a statement, and current even inside a long transaction), so
workers whose clocks disagree still agree on who holds a lease.

``begin`` calls that arrive together are one statement over arrays (``write_begins``); so are
``complete`` calls (``write_completes``), and both kinds together (``write_calls``). A batch
carries each key once: PostgreSQL refuses an ``INSERT ... ON CONFLICT DO UPDATE`` that touches
one row twice, so a key repeated in a batch waits for the next round, and the first claim
orders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from oncely._batch import copy_error
from oncely.errors import LeaseLost, StoreError
from oncely.stores._key_batch import (
    BeginCall,
    CompleteCall,
    Fetch,
    complete_rounds,
    distinct,
    new_token,
)
from oncely.stores.base import Begin, Outcome

BATCH = 256
"""Most calls one batched statement carries."""

CLAIM_ROUNDS = 3
"""How often ``write_begins`` tries a key it found expired or absent but could not claim."""

RETRY_SOON = 0.05
"""``retry_after`` for a key that was neither claimable nor classifiable ``CLAIM_ROUNDS`` times
(e.g. an expired row another session keeps locked)."""

# A row's ``expires_at`` is when it may be deleted: a completed row's result ttl, or a running
# row's lease plus the stale grace. One indexed column keeps the sweep a range scan.
_EXPIRED = (
    "CASE {a}.state WHEN 'completed' THEN {a}.expires_at ELSE {a}.lease_until END "
    "<= statement_timestamp()"
)


@dataclass(frozen=True, slots=True)
class Sql:
    """Every statement of the store, for one table."""

    schema: tuple[str, ...]
    exists: str
    claim: str
    complete_many: str
    claim_and_complete: str
    complete_one: str
    renew: str
    release: str
    sweep: str


def statements(table: str, index: str) -> Sql:
    """The statements for ``table`` (already quoted), with ``index`` the expiry index name."""
    expired_t = _EXPIRED.format(a="t")
    # One statement claims every free or expired key of the batch and reports, for the
    # others, the row as it was when the statement started.
    # - ``free`` locks the expired rows nobody else has locked (SKIP LOCKED): a begin
    #   never waits for a lock another session holds, e.g. a transaction recording its
    #   completion. Rows that are live when the statement starts are never touched, so
    #   a duplicate costs a read, not a row lock (ON CONFLICT DO UPDATE locks the row
    #   even when its WHERE is false).
    # - the INSERT claims keys absent at the start (racing only other single-statement
    #   claims, which end at once) and the expired rows we hold. It inserts in key order:
    #   two batches inserting the same new keys wait for each other key by key, and in
    #   different orders they would deadlock.
    # - the final SELECT reads the snapshot (not the INSERT's own writes): the state the
    #   unclaimed keys were in at the statement's start.
    claim_ctes = f"""
        req AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[])
                AS r(key, fingerprint, token, lease)
        ),
        free AS (
            SELECT t.key FROM {table} t
            WHERE t.key = ANY($1::text[]) AND {expired_t}
            FOR UPDATE OF t SKIP LOCKED
        ),
        claimed AS (
            INSERT INTO {table} AS t
                (key, fingerprint, state, token, lease_until, result, expires_at)
            SELECT r.key, r.fingerprint, 'running', r.token,
                statement_timestamp() + make_interval(secs => r.lease), NULL,
                statement_timestamp() + make_interval(secs => r.lease + $5::float8)
            FROM req r
            WHERE r.key IN (SELECT key FROM free)
                OR NOT EXISTS (SELECT 1 FROM {table} x WHERE x.key = r.key)
            ORDER BY r.key
            ON CONFLICT (key) DO UPDATE SET
                fingerprint = excluded.fingerprint, state = 'running',
                token = excluded.token, lease_until = excluded.lease_until,
                result = NULL, expires_at = excluded.expires_at
            WHERE {expired_t}
            RETURNING t.key
        )"""
    claim_select = f"""
        SELECT r.key, c.key IS NOT NULL, x.fingerprint, x.state, x.result,
            extract(epoch FROM
                CASE x.state WHEN 'completed' THEN x.expires_at ELSE x.lease_until END
                - statement_timestamp())::float8
        FROM req r
        LEFT JOIN claimed c ON c.key = r.key
        LEFT JOIN {table} x ON x.key = r.key"""
    # A completed row keeps its token: a ``complete`` re-sent because the connection lost its
    # reply (``Keys.complete`` retries a failed one) matches it again and succeeds, as on
    # Redis, instead of reporting a lost lease for a completion that was recorded.
    complete_set = """state = 'completed', lease_until = NULL,
                result = d.result,
                expires_at = statement_timestamp() + make_interval(secs => d.ttl)"""
    return Sql(
        schema=(
            f"""CREATE TABLE IF NOT EXISTS {table} (
                key text PRIMARY KEY,
                fingerprint text NOT NULL,
                state text NOT NULL CHECK (state IN ('running', 'completed')),
                token text,
                lease_until timestamptz,
                result bytea,
                expires_at timestamptz NOT NULL
            )""",
            f"CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at)",
        ),
        exists=f"SELECT 1 FROM {table} LIMIT 0",
        # One statement claims every free or expired key of the batch and reports, for the
        # others, the row as it was when the statement started.
        # - ``free`` locks the expired rows nobody else has locked (SKIP LOCKED): a begin
        #   never waits for a lock another session holds, e.g. a transaction recording its
        #   completion. Rows that are live when the statement starts are never touched, so
        #   a duplicate costs a read, not a row lock (ON CONFLICT DO UPDATE locks the row
        #   even when its WHERE is false).
        # - the INSERT claims keys absent at the start (racing only other single-statement
        #   claims, which end at once) and the expired rows we hold. It inserts in key order:
        #   two batches inserting the same new keys wait for each other key by key, and in
        #   different orders they would deadlock.
        # - the final SELECT reads the snapshot (not the INSERT's own writes): the state the
        #   unclaimed keys were in at the statement's start.
        claim=f"WITH {claim_ctes} {claim_select}",
        complete_many=f"""
            UPDATE {table} AS t SET {complete_set}
            FROM unnest($1::text[], $2::text[], $3::bytea[], $4::float8[])
                AS d(key, token, result, ttl)
            WHERE t.key = d.key AND t.token = d.token
            RETURNING t.key
        """,
        # Completions ($6-$9) and claims ($1-$5) of distinct keys in one statement: one
        # round trip and one commit. The claim reads the statement's snapshot, so a key
        # completed here would still look running to it: callers keep the two key sets
        # apart. Rows: the claim's, with NULL first, then (key, NULL, ...) per completion.
        # Unlike a claim alone, this statement can deadlock with another worker's claim, in
        # one rare race (it completes a key whose lease ran out while the other claims that
        # key, and both insert the same new key): PostgreSQL then fails one of them (40P01,
        # StoreUnavailable), whose callers fail closed and retry; nothing is half-written.
        claim_and_complete=f"""
            WITH done AS (
                UPDATE {table} AS t SET {complete_set}
                FROM unnest($6::text[], $7::text[], $8::bytea[], $9::float8[])
                    AS d(key, token, result, ttl)
                WHERE t.key = d.key AND t.token = d.token
                RETURNING t.key
            ), {claim_ctes}
            SELECT NULL::text, * FROM ({claim_select}) AS claims
            UNION ALL
            SELECT key, NULL, NULL, NULL, NULL, NULL, NULL FROM done
        """,
        complete_one=f"""
            UPDATE {table} SET state = 'completed', lease_until = NULL,
                result = $3::bytea,
                expires_at = statement_timestamp() + make_interval(secs => $4::float8)
            WHERE key = $1 AND token = $2 AND state = 'running'
        """,
        renew=f"""
            UPDATE {table} SET
                lease_until = statement_timestamp() + make_interval(secs => $3::float8),
                expires_at = statement_timestamp() + make_interval(secs => $3::float8 + $4)
            WHERE key = $1 AND token = $2 AND state = 'running'
        """,
        release=f"DELETE FROM {table} WHERE key = $1 AND token = $2 AND state = 'running'",
        # ctid is stable here: the rows are locked by the same statement that deletes them.
        # SKIP LOCKED: never wait for a worker's claim, and let several sweepers share work.
        sweep=f"""
            DELETE FROM {table} WHERE ctid IN (
                SELECT ctid FROM {table} WHERE expires_at <= statement_timestamp()
                LIMIT $1 FOR UPDATE SKIP LOCKED
            )
        """,
    )


def db_key(key: str) -> str:
    """The key as stored: PostgreSQL ``text`` cannot hold NUL, so NUL becomes ``\\0`` and a
    backslash is doubled (only when either occurs, so ordinary keys are stored as they are).
    The mapping is one-to-one: in an escaped key every backslash starts an escape.

    Raises:
        StoreError: the key has no UTF-8 form (a lone surrogate). Checked here, per call:
            in a batched statement it would fail every call the statement carried.
    """
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError as exc:
            raise StoreError(f"postgresql: key {key!r} cannot be encoded as UTF-8: {exc}") from exc
    if "\x00" in key or "\\" in key:
        return key.replace("\\", "\\\\").replace("\x00", "\\0")
    return key


async def write_begins(
    fetch: Fetch, sql: Sql, calls: list[BeginCall], grace: float
) -> list[Begin | Exception]:
    """``begin`` for each call, in one statement in the common case.

    A key the claim did not take is classified from the row as the statement saw it. A row
    that was absent or expired then, yet not claimed (another session inserted it first, or
    holds it locked), tells nothing, so that call goes into another round; after
    ``CLAIM_ROUNDS`` it answers ``IN_PROGRESS`` with ``RETRY_SOON``: the key was busy every
    time we tried.

    A failed statement committed nothing, so its error goes to exactly the calls not yet
    answered; calls granted by an earlier round keep their ``NEW``.
    """
    outcomes: list[Begin | Exception | None] = [None] * len(calls)
    todo = list(range(len(calls)))
    try:
        for _ in range(CLAIM_ROUNDS):
            now_round, later = distinct(calls, todo)
            tokens = [new_token() for _ in now_round]
            args = (
                [calls[i].key for i in now_round],
                [calls[i].fingerprint for i in now_round],
                tokens,
                [calls[i].lease for i in now_round],
                grace,
            )
            rows = {row[0]: row for row in await fetch(sql.claim, args)}
            todo = later
            for i, token in zip(now_round, tokens, strict=True):
                outcome = _outcome(rows[calls[i].key], calls[i].fingerprint, token)
                if outcome is None:
                    todo.append(i)
                else:
                    outcomes[i] = outcome
            if not todo:
                break
            todo.sort()
    except StoreError as exc:
        return [copy_error(exc) if o is None else o for o in outcomes]
    busy = Begin(Outcome.IN_PROGRESS, retry_after=RETRY_SOON)
    return [busy if o is None else o for o in outcomes]


async def write_completes(
    fetch: Fetch, sql: Sql, calls: list[CompleteCall]
) -> list[Exception | None]:
    """``complete`` for each call, one statement over arrays per round (see
    ``complete_rounds``)."""

    async def write_round(batch: list[CompleteCall]) -> set[str]:
        args = (
            [c.key for c in batch],
            [c.token for c in batch],
            [c.result for c in batch],
            [c.ttl for c in batch],
        )
        return {row[0] for row in await fetch(sql.complete_many, args)}

    return await complete_rounds(calls, write_round)


async def write_calls(
    fetch: Fetch, sql: Sql, calls: list[BeginCall | CompleteCall], grace: float
) -> list[Any]:
    """``begin`` and ``complete`` calls that arrived together: a ``Begin`` or ``None`` per
    call, or its error. When both kinds are there, the completions and the claims of the
    other keys share one statement (``claim_and_complete``); what that round leaves (a
    key repeated, a begin of a key being completed, a claim to try again) goes through
    ``write_completes`` and then ``write_begins``, so a begin of a key completed in this
    batch finds it completed.

    A failed statement committed nothing: its error goes to the calls it carried and to
    those after it; calls answered by an earlier statement keep their answers.
    """
    begins = [i for i, c in enumerate(calls) if isinstance(c, BeginCall)]
    completes = [i for i, c in enumerate(calls) if isinstance(c, CompleteCall)]
    outcomes: list[Any] = [None] * len(calls)
    if not begins or not completes:
        if begins:
            return await write_begins(fetch, sql, cast(list[BeginCall], calls), grace)
        return await write_completes(fetch, sql, cast(list[CompleteCall], calls))
    c_now, c_later = distinct(calls, completes)
    completing = {calls[i].key for i in completes}
    b_now, b_later = distinct(calls, [i for i in begins if calls[i].key not in completing])
    b_later += [i for i in begins if calls[i].key in completing]
    tokens = [new_token() for _ in b_now]
    begun = [cast(BeginCall, calls[i]) for i in b_now]
    done = [cast(CompleteCall, calls[i]) for i in c_now]
    args = (
        [c.key for c in begun],
        [c.fingerprint for c in begun],
        tokens,
        [c.lease for c in begun],
        grace,
        [c.key for c in done],
        [c.token for c in done],
        [c.result for c in done],
        [c.ttl for c in done],
    )
    try:
        rows = await fetch(sql.claim_and_complete, args)
    except StoreError as exc:
        return [copy_error(exc) for _ in calls]
    completed = {row[0] for row in rows if row[0] is not None}
    claims = {row[1]: row[1:] for row in rows if row[0] is None}
    for i in c_now:
        if calls[i].key not in completed:
            outcomes[i] = LeaseLost(
                f"lease on key {calls[i].key!r} is no longer held by this token"
            )
    for i, call, token in zip(b_now, begun, tokens, strict=True):
        outcome = _outcome(claims[call.key], call.fingerprint, token)
        if outcome is None:
            b_later.append(i)
        else:
            outcomes[i] = outcome
    if c_later:
        later = [cast(CompleteCall, calls[i]) for i in c_later]
        for i, error in zip(c_later, await write_completes(fetch, sql, later), strict=True):
            outcomes[i] = error
    if b_later:
        b_later.sort()
        again = [cast(BeginCall, calls[i]) for i in b_later]
        got = await write_begins(fetch, sql, again, grace)
        for i, answer in zip(b_later, got, strict=True):
            outcomes[i] = answer
    return outcomes


def _outcome(row: Any, fingerprint: str, token: str) -> Begin | None:
    """The outcome of one call from its claim row, or ``None`` to try again."""
    _, granted, found_fingerprint, state, result, remaining = row
    if granted:
        return Begin(Outcome.NEW, token=token)
    if state is None or remaining is None or remaining <= 0:
        return None  # absent or expired at the start, and not ours: ask again
    if found_fingerprint != fingerprint:
        return Begin(Outcome.MISMATCH)
    if state == "completed":
        return Begin(Outcome.COMPLETED, result=None if result is None else bytes(result))
    return Begin(Outcome.IN_PROGRESS, retry_after=float(remaining))
