"""Listing, replaying and purging ``<topic>.dlq`` on RabbitMQ (``AmqpBroker``'s
``DeadLetterAdmin`` methods, which document what holds): each on a short-lived channel of its
own, reading with ``basic.get`` and leaving what it does not take unacked, so RabbitMQ puts it
back in place when the channel closes."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

import aiormq.exceptions
from pamqp.commands import Basic

from oncely.brokers._amqp_message import own_headers, parse, properties, props_of, text
from oncely.brokers._amqp_topology import dlq_name, map_errors
from oncely.brokers.base import DeadLetter, Headers, replayed_headers

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

__all__ = ["list_dead_letters", "purge_dead_letters", "replay_dead_letters"]

_FRESH = (Headers.ATTEMPT, Headers.REASON, Headers.FAILED_AT)
"""Headers of a dead letter's failure history, dropped when it is replayed."""


async def dlq_exists(connection: AbstractRobustConnection, topic: str) -> bool:
    """``AmqpBroker.has_dead_letter_queue``: a passive declare of the DLQ (creates nothing)."""
    try:
        async with connection.channel(publisher_confirms=False) as channel:
            await channel.declare_queue(dlq_name(topic), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def list_dead_letters(
    connection: AbstractRobustConnection, topic: str, limit: int
) -> list[DeadLetter]:
    """``AmqpBroker.dead_letters``."""
    out: list[DeadLetter] = []
    with map_errors("admin"):
        async with connection.channel(publisher_confirms=False) as channel:
            queue = await channel.get_queue(dlq_name(topic), ensure=False)
            last = 0
            while len(out) < limit:
                message = await queue.get(no_ack=False, fail=False, timeout=10)
                if message is None:
                    break
                out.append(_dead_letter(topic, message))
                last = message.delivery_tag or last
            if last:
                raw = await channel.get_underlay_channel()
                await raw.basic_nack(last, multiple=True, requeue=True)
    return out


async def replay_dead_letters(
    connection: AbstractRobustConnection,
    topic: str,
    ids: list[str] | None,
    send: Callable[[str, bytes, Basic.Properties], Awaitable[None]],
) -> int:
    """``AmqpBroker.replay``; ``send`` publishes to a queue and waits for the confirm."""
    wanted = None if ids is None else set(ids)
    moved = 0
    started = time.time()
    with map_errors("admin"):
        async with connection.channel(publisher_confirms=False) as channel:
            queue = await channel.get_queue(dlq_name(topic), ensure=False)
            while wanted is None or wanted:
                message = await queue.get(no_ack=False, fail=False, timeout=10)
                if message is None:
                    break
                if _failed_at(message) >= started:
                    break  # new since this replay began; requeued in place on close
                p = parse(message)
                if wanted is not None and p.id not in wanted:
                    continue  # stays unacked; requeued in place when the channel closes
                table = own_headers(message.headers)
                for name in _FRESH:
                    table.pop(name, None)
                table.update(replayed_headers(p.headers, time.time()))
                table[Headers.MESSAGE_ID] = p.id
                table.setdefault(Headers.PUBLISHED_AT, repr(p.enqueued_at))
                await send(
                    topic,
                    message.body,
                    properties(p.id, table, p.enqueued_at, props_of(message)),
                )
                await message.ack()
                moved += 1
                if wanted is not None:
                    wanted.discard(p.id)
    return moved


async def purge_dead_letters(
    connection: AbstractRobustConnection, topic: str, older_than: float | None
) -> int:
    """``AmqpBroker.purge``."""
    cutoff = None if older_than is None else time.time() - older_than
    purged = 0
    with map_errors("admin"):
        async with connection.channel(publisher_confirms=False) as channel:
            queue = await channel.get_queue(dlq_name(topic), ensure=False)
            while True:
                message = await queue.get(no_ack=False, fail=False, timeout=10)
                if message is None:
                    break
                if cutoff is not None and _dead_letter(topic, message).failed_at >= cutoff:
                    continue  # stays unacked; requeued in place when the channel closes
                await message.ack()
                purged += 1
    return purged


def _dead_letter(topic: str, message: AbstractIncomingMessage) -> DeadLetter:
    p = parse(message)
    raw = message.headers or {}
    reason = p.headers.get(Headers.REASON) or text(raw.get("x-first-death-reason", ""))
    failed_at = _failed_at(message, p.enqueued_at)
    try:
        attempt = int(p.headers.get(Headers.ATTEMPT, "0"))
    except ValueError:
        attempt = 0
    return DeadLetter(
        id=p.id,
        topic=topic,
        body=message.body,
        headers=p.headers,
        reason=reason,
        attempt=attempt,
        failed_at=failed_at,
    )


def _failed_at(message: AbstractIncomingMessage, default: float = 0.0) -> float:
    """When the letter was dead-lettered: oncely's header, else the latest ``x-death`` time
    (RabbitMQ's own dead-lettering, newest entry first), else ``default``."""
    raw = message.headers or {}
    try:
        return float(text(raw[Headers.FAILED_AT]))
    except (KeyError, ValueError):
        pass
    deaths = raw.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], dict):
        stamp = deaths[0].get("time")
        if isinstance(stamp, datetime):
            return stamp.timestamp()
    return default
