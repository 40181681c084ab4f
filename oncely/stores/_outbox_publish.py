"""Publishing one claim: keys in parallel, each key's rows one after the other."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

from oncely._tracing_headers import messaging_system, send, tracer
from oncely.brokers.base import Headers
from oncely.stores._outbox_base import Failure, Row, backoff

if TYPE_CHECKING:
    from oncely.brokers.base import Broker

__all__ = ["headers_for", "publish_rows"]

MAX_ERROR = 1000
"""Characters of a publish error kept in ``last_error``."""


def error_text(text: str) -> str:
    """``text`` as ``last_error`` keeps it: clipped, and with each NUL written ``\\x00``.
    PostgreSQL's ``text`` cannot hold a NUL, and a driver's error may quote one (a header, a
    payload): the UPDATE that records it would fail, and with it the marking of the whole
    batch, sent rows included, which would then be published again on every batch."""
    return text[:MAX_ERROR].replace("\x00", "\\x00")


def headers_for(row: Row) -> dict[str, str]:
    """The headers a row is published with: the user's, plus ``oncely-published-at`` (when
    the row was added) and the keys. A keyed row carries its key in ``oncely-key`` (brokers
    that order by key group by it) and its stable message id in ``oncely-dedupe-key`` (a
    consumer's default key source dedupes re-publishes of the row on it, and never takes two
    rows of one key for one message). A row without a key carries its message id in
    ``oncely-key``, which serves both (one header fewer, for SQS's small budget)."""
    headers = dict(row.headers)
    if row.key is not None:
        headers[Headers.KEY] = row.key
        headers.setdefault(Headers.DEDUPE_KEY, row.message_id)
    else:
        headers.setdefault(Headers.KEY, row.message_id)
    headers.setdefault(Headers.PUBLISHED_AT, repr(row.created_at))
    return headers


async def publish_rows(
    broker: Broker,
    rows: list[Row],
    *,
    publish_timeout: float,
    retry_base: float,
    retry_cap: float,
    deadline: float | None = None,
) -> tuple[list[int], list[Failure]]:
    """Publish ``rows`` (a claim, in id order) and return the ids sent and the failures.

    Rows of different keys (and rows without a key) are published concurrently, so a batch
    costs about one confirm round trip per key instead of one per row. Rows of one key go out
    strictly one after the other, each only after the broker confirmed the previous one; the
    first failure ends its key's run, so no later row of that key overtakes it. Every error
    (a broker error, a timeout, a bad header) is a failure to retry, never a reason to drop.

    No row is started once the event loop's clock passes ``deadline``: the rows left are in
    neither list, and the claim releases them for the next batch.
    """
    loop = asyncio.get_running_loop()
    retry = (retry_base, retry_cap)
    # Tracing on: each publish is a ``send`` span, a child of the row's ``create`` span.
    traced = tracer()
    system = messaging_system(broker.url)
    chains: dict[object, list[Row]] = {}
    for row in rows:
        chains.setdefault(row.key if row.key is not None else row.id, []).append(row)
    sent: list[int] = []
    failed: list[Failure] = []

    async def run(chain: list[Row]) -> None:
        for row in chain:
            if deadline is not None and loop.time() >= deadline:
                return
            if row.error is not None:
                error = error_text(row.error)
                failed.append(Failure(row.id, error, backoff(row.attempts + 1, *retry)))
                return
            headers = headers_for(row)
            try:
                async with asyncio.timeout(publish_timeout):
                    if traced is None:
                        await broker.publish(
                            row.topic, row.body, headers=headers, message_id=row.message_id
                        )
                    else:
                        await send(
                            traced,
                            system,
                            row.topic,
                            headers,
                            partial(
                                broker.publish,
                                row.topic,
                                row.body,
                                headers=headers,
                                message_id=row.message_id,
                            ),
                            message_id=row.message_id,
                            resume=True,
                        )
            except Exception as exc:
                error = error_text(f"{type(exc).__name__}: {exc}")
                failed.append(Failure(row.id, error, backoff(row.attempts + 1, *retry)))
                return
            sent.append(row.id)

    await asyncio.gather(*(run(chain) for chain in chains.values()))
    return sent, failed
