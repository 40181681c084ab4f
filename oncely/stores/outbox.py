"""A transactional outbox: announce a database change exactly when it commits.

Write the business row and the message that announces it in **one local transaction**, on the
connection you already use; a relay publishes committed messages to any oncely broker
afterwards::

    outbox = Outbox.from_url("postgresql://app@db/app")       # or "sqlite:///app.db"
    await outbox.migrate()                                      # once: CREATE TABLE IF NOT EXISTS

    async with conn.transaction():                              # asyncpg (aiosqlite: BEGIN/commit)
        await conn.execute("INSERT INTO orders VALUES ($1, $2)", order.id, order.qty)
        await outbox.add(conn, "orders.placed", order, key=order.id)

    async with OutboxRelay(outbox, "amqp://guest:guest@rabbit/"):   # or `oncely outbox relay`
        ...

A rolled-back transaction leaves no message; a committed one is published, at least once.

**Message ids.** ``add`` chooses the message id (a UUID, or yours) and stores it in the row.
Every publish of the row uses it, as the broker message id and as the key a consumer's
default key source (``key="auto"``) dedupes on (``oncely-dedupe-key`` for a row with a
``key``, else ``oncely-key``). A relay that dies after the broker confirmed a publish but before
it marked the row sent publishes the row again after a restart, with the same id, so a
consumer running an effectively-once handler absorbs the duplicate: **at-least-once publish
with stable ids, plus consumer dedupe, is effectively once.**

**Keys and order.** ``key`` (like ``Publisher.publish(key=)``) becomes the ``oncely-key``
header (Kafka's record key, SQS FIFO's group), and it orders: rows with the same key are
published in the order they were added, each only after the broker confirmed the previous one,
however many relays run. That is order *at the broker*; a consumer sees it only if it
consumes in order (one consumer per queue on RabbitMQ, or handler concurrency 1). Rows without
a key are not ordered. One key spans several distinct messages ("placed", then "shipped"), so
the consumer's default key source dedupes on each row's ``oncely-dedupe-key``, not on the key;
``key="header:oncely-key"`` at the consumer dedupes on the key instead. See ``_outbox_pg``
and ``_outbox_sqlite`` for how claims keep the order.

**The relay** claims batches (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` in a transaction; SQLite:
a lease stamped by one ``UPDATE ... RETURNING``), publishes them through the broker waiting for
confirms (keys in parallel), marks them sent, and commits. It wakes on PostgreSQL
``LISTEN/NOTIFY`` (``add`` notifies in the user's transaction, delivered on commit) and polls
every ``poll`` seconds as a fallback; on SQLite it polls, and an ``add`` in the same process
wakes it at once. A failing publish is recorded on the row (``attempts``, ``last_error``) and
retried with exponential backoff, never dropped; the rest of that key waits behind it, other
keys go on. Sent rows are deleted ``retention`` seconds after they were sent, in bounded
batches.

The table (``schema()`` returns the exact DDL; ``migrate()`` runs it)::

    id            bigserial / INTEGER PRIMARY KEY AUTOINCREMENT   add order
    message_id    text      the stable id every publish of the row carries
    topic         text
    key           text      NULL: unordered
    headers       jsonb / TEXT (JSON object of str)
    body          bytea / BLOB
    created_at    timestamptz / REAL (unix time)
    sent_at       NULL until the broker confirmed
    attempts      publishes tried
    last_error    the last failed publish's error
    available_at  (PostgreSQL) not before: the backoff after a failure
    lease_until, claim_token   (SQLite) the claim lease, and the backoff after a failure
"""

from __future__ import annotations

from oncely.stores._outbox_base import DEFAULT_TABLE
from oncely.stores._outbox_relay import OutboxRelay, RelayStats
from oncely.stores._outbox_table import Outbox

__all__ = ["DEFAULT_TABLE", "Outbox", "OutboxRelay", "RelayStats"]
