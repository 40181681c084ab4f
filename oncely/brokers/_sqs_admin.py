"""Dead letters on SQS: ``reject``, and the ``DeadLetterAdmin`` listing and replay.

SQS cannot read a queue without receiving from it. Listing therefore receives every message
of ``<topic>-dlq`` with a short visibility, keeps none, and makes them visible again at once
(``ChangeMessageVisibility`` 0): while a listing or replay runs, another reader of the DLQ
does not see those messages, and each listing adds one to their ``ApproximateReceiveCount``
(the DLQ has no redrive policy, so nothing moves because of it). A process that dies during
a listing leaves those messages invisible for up to ``_HOLD`` seconds; nothing is lost. A DLQ
holding more than ``_SCAN_LIMIT`` messages is listed and replayed in part. On a FIFO DLQ one
scan reaches only the messages of a group that the first receive touching it returned (SQS
hands out no more of a group while some of it is received): a listing logs how many it could
not reach, and replay scans again while a pass moves anything.

Purge receives the same way and deletes each dead letter old enough, one by one (an
interrupted purge has deleted some); the others are made visible again.

Replay re-sends each chosen dead letter to the topic's queue without the dead-letter headers
(so its attempt starts again at 1), then deletes it from the DLQ: a crash in between leaves a
duplicate, never a loss. ``StartMessageMoveTask`` would move *every* message and cannot pick
ids, so it is not used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from oncely.brokers._sqs_errors import map_errors
from oncely.brokers._sqs_wire import (
    MAX_ATTRIBUTES,
    PACKED,
    Outgoing,
    copy_attributes,
    decode,
    is_fifo,
    message_size,
    text_value,
)
from oncely.brokers.base import DeadLetter, Headers, replayed_headers

if TYPE_CHECKING:
    from types_aiobotocore_sqs.type_defs import MessageAttributeValueTypeDef, MessageTypeDef

    from oncely.brokers._sqs_delivery import SqsDelivery
    from oncely.brokers._sqs_link import BrokerLink

log = logging.getLogger("oncely.brokers.sqs")

_HOLD = 30  # seconds a listing keeps dead letters invisible at most
_SCAN_LIMIT = 10_000
_DEAD = (Headers.REASON, Headers.ATTEMPT, Headers.FAILED_AT)

Attributes = dict[str, "MessageAttributeValueTypeDef"]


def _string(value: str) -> MessageAttributeValueTypeDef:
    return {"DataType": "String", "StringValue": value}


def _fit(attributes: Attributes, extra: Attributes) -> Attributes:
    """``attributes`` plus ``extra``; if that is over SQS's 10, the message's other headers
    are packed into one JSON attribute (``oncely-headers``) rather than dropped."""
    out = {**attributes, **extra}
    if len(out) <= MAX_ATTRIBUTES:
        return out
    keep = {k: v for k, v in out.items() if k.startswith("oncely-")}
    packed = {k: _text(v) for k, v in out.items() if not k.startswith("oncely-")}
    keep[PACKED] = _string(json.dumps(packed))
    return keep


def _text(value: MessageAttributeValueTypeDef) -> str:
    """An attribute's value as a header reads it (``decode``): a binary one as base64."""
    binary = value.get("BinaryValue")
    if isinstance(binary, bytes):
        return base64.b64encode(binary).decode("ascii")
    return value.get("StringValue", "")


async def dead_letter(broker: BrokerLink, delivery: SqsDelivery, reason: str) -> None:
    """Check the receipt handle, send to the DLQ with the reason, then delete the original."""
    _, dlq = await broker.queue_urls(delivery.topic)
    # Proves the handle is still ours (DeliveryExpired otherwise) before a dead letter exists.
    await broker._change_visibility(delivery.queue_url, delivery.receipt, _HOLD)
    attributes = _fit(
        copy_attributes(delivery.attributes or {}),
        {
            Headers.MESSAGE_ID: _string(delivery.id),
            Headers.REASON: _string(text_value(reason) or "(no reason given)"),
            Headers.ATTEMPT: _string(str(delivery.attempt)),
            Headers.FAILED_AT: _string(repr(time.time())),
        },
    )
    body = delivery.text
    out = Outgoing(delivery.id, body, attributes, message_size(body, attributes))
    fifo = is_fifo(delivery.topic, broker.options)
    group = delivery.group or delivery.key
    await broker._send(dlq, out, group=group if fifo else None, dedupe=uuid.uuid4().hex)
    await broker._delete(delivery.queue_url, delivery.receipt)


async def _scan(broker: BrokerLink, dlq: str) -> list[MessageTypeDef]:
    """Receive every dead letter (each held invisible for ``_HOLD`` seconds)."""
    client = await broker._connected()
    # By message id, with the newest receipt handle: a letter whose hold ran out during a
    # long scan is received again, and only that receive's handle still works.
    found: dict[str, MessageTypeDef] = {}
    wait = 0
    while len(found) < _SCAN_LIMIT:
        broker.api_calls["admin"] += 1
        with map_errors("admin"):
            got = await client.receive_message(
                QueueUrl=dlq,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait,
                VisibilityTimeout=_HOLD,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=[
                    "ApproximateReceiveCount",
                    "SentTimestamp",
                    "MessageGroupId",
                ],
            )
        new = 0
        for m in got.get("Messages", []):
            key = m.get("MessageId", "")
            new += key not in found
            found[key] = m
        if not new:
            # A short poll samples only some of SQS's servers; confirm the end with a wait.
            if wait or not broker.options.wait:
                break
            wait = 1
            continue
        wait = 0
    return list(found.values())


async def _unhold(broker: BrokerLink, dlq: str, messages: list[MessageTypeDef]) -> None:
    """Make the scanned letters visible again; one that cannot be is visible within
    ``_HOLD`` seconds anyway, so a failure is logged, not raised."""
    results = await asyncio.gather(
        *(broker._change_visibility(dlq, m["ReceiptHandle"], 0) for m in messages),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        log.warning(
            "%d dead letters were not handed back at once (visible within %ds): %r",
            len(failed),
            _HOLD,
            failed[0],
        )


def _letter(topic: str, message: MessageTypeDef) -> DeadLetter:
    data = decode(message)
    h = data.headers
    try:
        failed_at = float(h[Headers.FAILED_AT])
    except (KeyError, ValueError):
        failed_at = data.sent_at
    try:
        attempt = int(h[Headers.ATTEMPT])
    except (KeyError, ValueError):
        attempt = data.attempt
    reason = h.get(Headers.REASON) or "moved by the SQS redrive policy (maxReceiveCount)"
    return DeadLetter(
        id=data.id,
        topic=topic,
        body=data.body,
        headers=h,
        reason=reason,
        attempt=attempt,
        failed_at=failed_at,
    )


async def dead_letters(broker: BrokerLink, topic: str, *, limit: int) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first (by ``oncely-dead-lettered-at``), left in
    the DLQ."""
    _, dlq = await broker.queue_urls(topic)
    messages = await _scan(broker, dlq)
    if is_fifo(topic, broker.options) or len(messages) >= _SCAN_LIMIT:
        broker.api_calls["admin"] += 1
        with map_errors("admin"):
            got = await broker._connected()
            attrs = await got.get_queue_attributes(
                QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"]
            )
        # What is still visible now was out of the scan's reach (SQS hands out no more of a
        # FIFO group while some of it is received).
        left = int(attrs.get("Attributes", {}).get("ApproximateNumberOfMessages", "0"))
        if left:
            log.warning(
                "%s: listed %d dead letters; about %d more were out of reach (SQS hands out "
                "no more of a FIFO group while some of it is received); replay moves them all",
                topic,
                len(messages),
                left,
            )
    try:
        letters = sorted((_letter(topic, m) for m in messages), key=lambda x: x.failed_at)
    finally:
        await _unhold(broker, dlq, messages)
    return letters[:limit]


async def replay(broker: BrokerLink, topic: str, *, ids: list[str] | None) -> int:
    """Re-send the chosen dead letters to ``topic`` with a fresh attempt, then delete them.

    On a FIFO DLQ one scan reaches at most 10 messages of each group (SQS hands out no more
    of a group while some are in flight), so replay scans again while a pass moves some."""
    wanted = None if ids is None else set(ids)
    moved = 0
    for _ in range(_SCAN_LIMIT):
        n, done = await _replay_pass(broker, topic, wanted)
        moved += n
        if wanted is not None:
            wanted -= done
        if not n or not is_fifo(topic, broker.options) or wanted == set():
            break
    return moved


async def _replay_pass(
    broker: BrokerLink, topic: str, wanted: set[str] | None
) -> tuple[int, set[str]]:
    url, dlq = await broker.queue_urls(topic)
    messages = await _scan(broker, dlq)
    fifo = is_fifo(topic, broker.options)
    chosen = [m for m in messages if wanted is None or decode(m).id in wanted]
    others = [m for m in messages if m not in chosen]
    moved = 0
    done: set[str] = set()
    try:
        for m in sorted(chosen, key=lambda m: _letter(topic, m).failed_at):
            data = decode(m)
            attributes = {
                k: v
                for k, v in copy_attributes(m.get("MessageAttributes", {})).items()
                if k not in _DEAD
            }
            replay_marks = replayed_headers(
                {Headers.REPLAY_COUNT: data.headers.get(Headers.REPLAY_COUNT, "0")}, time.time()
            )
            attributes = _fit(attributes, {k: _string(v) for k, v in replay_marks.items()})
            body = m.get("Body", "")
            out = Outgoing(data.id, body, attributes, message_size(body, attributes))
            group = data.headers.get(Headers.KEY) or data.id
            await broker._send(url, out, group=group if fifo else None, dedupe=uuid.uuid4().hex)
            await broker._delete(dlq, m["ReceiptHandle"])
            moved += 1
            done.add(data.id)
    finally:
        await _unhold(broker, dlq, others + chosen[moved:])
    return moved, done


async def purge(broker: BrokerLink, topic: str, *, older_than: float | None) -> int:
    """Delete the dead letters dead-lettered more than ``older_than`` seconds ago (all with
    ``None``); the others are made visible again."""
    cutoff = None if older_than is None else time.time() - older_than
    _, dlq = await broker.queue_urls(topic)
    messages = await _scan(broker, dlq)
    doomed: list[MessageTypeDef] = []
    kept: list[MessageTypeDef] = []
    for m in messages:
        (doomed if cutoff is None or _letter(topic, m).failed_at < cutoff else kept).append(m)
    purged = 0
    try:
        for m in doomed:
            await broker._delete(dlq, m["ReceiptHandle"])
            purged += 1
    finally:
        await _unhold(broker, dlq, kept + doomed[purged:])
    return purged
