"""One received SQS message, for ``SqsBroker``; see ``oncely.brokers.sqs``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Protocol

from oncely.brokers._sqs_wire import (
    ENCODING,
    MAX_VISIBILITY,
    PACKED,
    attribute_text,
    decode,
    decode_body,
    decode_headers,
)
from oncely.brokers.base import Delivery, Headers
from oncely.errors import AlreadySettled, BrokerError, DeliveryExpired, NotSupported

if TYPE_CHECKING:
    from collections.abc import Mapping

    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueOutputTypeDef,
        MessageTypeDef,
    )

    from oncely.brokers._sqs_link import BrokerLink

__all__ = ["SqsDelivery", "SubscriptionLink"]

log = logging.getLogger("oncely.brokers.sqs")

_MARGIN = 5.0
"""Seconds kept clear of the 12-hour visibility cap, for clock and request latency."""


class SubscriptionLink(Protocol):
    """What a delivery needs from its subscription (``SqsSubscription`` satisfies it), so this
    module never imports ``_sqs_consume`` (which imports it)."""

    topic: str

    @property
    def broker(self) -> BrokerLink:
        """The broker the subscription receives through."""
        ...

    def _settled(self, delivery: SqsDelivery, *, returned: bool) -> None:
        """A yielded delivery was settled: free its slot; on FIFO, release its group."""
        ...


class SqsDelivery(Delivery):
    """One received SQS message. See ``oncely.brokers.sqs`` for the guarantees."""

    __slots__ = (
        "_attempt",
        "_body_text",
        "_capped",
        "_decoded",
        "_done",
        "_enqueued",
        "_holding",
        "_sub",
        "attributes",
        "batch",
        "group",
        "queue_url",
        "receipt",
        "received",
    )
    _attempt: int | str
    _enqueued: float | str

    def __init__(
        self,
        sub: SubscriptionLink,
        queue_url: str,
        message: MessageTypeDef,
        received: float,
        batch: int = 0,
    ) -> None:
        # Delivery.__init__'s fields set here directly (a keyword call per message is
        # measurable on this path), and the headers decoded only when read: only the three
        # attributes that make the id, the key and the body are looked at here.
        self._decoded: dict[str, str] | None = None
        attributes = message.get("MessageAttributes")
        text = message.get("Body", "")
        if attributes and PACKED in attributes:
            # A dead letter's packed headers may hold any of them: the whole decoding.
            id_, self.body, headers, self._attempt, self._enqueued, group = decode(message)
            self._decoded = headers
            self.key = headers.get(Headers.KEY, id_)
        else:
            if attributes:
                id_ = _text(attributes, Headers.MESSAGE_ID) or message.get("MessageId", "")
                key = _text(attributes, Headers.KEY)
                self.key = id_ if key is None else key
                self.body = decode_body(text, _text(attributes, ENCODING), id_)
            else:
                id_ = self.key = message.get("MessageId", "")
                self.body = text.encode("utf-8")
            system = message.get("Attributes") or {}
            # Kept as SQS sent them, parsed on first read: nothing reads them for most
            # messages, and two int() parses per message are measurable here.
            self._attempt = system.get("ApproximateReceiveCount", "1")
            self._enqueued = system.get("SentTimestamp", "0")
            group = system.get("MessageGroupId")
        self.id = id_
        self.topic = sub.topic
        self._sub = sub
        self.queue_url = queue_url
        # Not the message itself: its dicts (the message's, its system attributes') would
        # live as long as the delivery, more objects in flight per message for the garbage
        # collector. What a dead letter and the headers need of it is kept.
        self.attributes = attributes
        """The message attributes as received (``MessageAttributes``), if any."""
        self._body_text = text
        self.receipt = message["ReceiptHandle"]
        self.received = received
        self.group: str | None = group
        self.batch = batch  # which receive brought it (FIFO group bookkeeping)
        self._done = False
        self._holding = True  # counts against the subscription's prefetch
        self._capped = False

    @property
    def headers(self) -> Mapping[str, str]:
        """The message attributes as headers (see ``_sqs_wire.decode``), decoded on first
        read."""
        decoded = self._decoded
        if decoded is None:
            attributes = self.attributes
            decoded = decode_headers(attributes) if attributes else {}
            decoded.pop(ENCODING, None)
            self._decoded = decoded
        return decoded

    @headers.setter
    def headers(self, value: Mapping[str, str]) -> None:
        self._decoded = dict(value)

    @property
    def attempt(self) -> int:
        """SQS's ``ApproximateReceiveCount``, parsed on first read."""
        attempt = self._attempt
        if isinstance(attempt, str):
            attempt = self._attempt = int(attempt)
        return attempt

    @attempt.setter
    def attempt(self, value: int) -> None:
        self._attempt = value

    @property
    def enqueued_at(self) -> float:
        """SQS's ``SentTimestamp`` in seconds, parsed on first read."""
        enqueued = self._enqueued
        if isinstance(enqueued, str):
            enqueued = self._enqueued = int(enqueued) / 1000
        return enqueued

    @enqueued_at.setter
    def enqueued_at(self, value: float) -> None:
        self._enqueued = value

    @property
    def text(self) -> str:
        """The body as SQS holds it (``Body``; base64 when ``oncely-body-encoding`` says so)."""
        return self._body_text

    @property
    def settled(self) -> bool:
        """True from the moment ``ack`` or ``nack`` queues its batch entry (it cannot be
        withdrawn: cancelled, the call still goes out) and after ``reject``; false again if
        the ack or nack fails."""
        return self._done

    def _check(self) -> None:
        if self._done:
            raise AlreadySettled(f"delivery {self.id} was already settled")

    def visibility_left(self) -> float:
        """Seconds of the 12-hour visibility budget this receive has left."""
        return MAX_VISIBILITY - _MARGIN - (time.monotonic() - self.received)

    async def ack(self) -> None:
        """Delete the message, batched with other acks of its queue (``DeleteMessageBatch``).

        Raises:
            DeliveryExpired: SQS refused the receipt handle (the message was received again).
            ConnectionLost: SQS could not be reached; the message may come back.
        """
        if self._done:
            raise AlreadySettled(f"delivery {self.id} was already settled")
        # Settled from here on: the delete is queued and goes out even if this is cancelled
        # (a batch entry cannot be withdrawn), so no visibility change may follow it. The
        # runtime gives back what a cancel left unsettled, and a nack racing the delete
        # reported the message returned while the delete removed it; a beat racing it got
        # the handle refused. A cancelled ack is an ack whose outcome nobody hears: the
        # message is deleted, or (the delete failed) comes back when its visibility runs out.
        self._done = True
        # The hot path: no context manager, and the batcher's future awaited directly.
        sub = self._sub
        try:
            await sub.broker._delete(self.queue_url, self.receipt)
        except BrokerError:
            self._done = False  # failed: the message is left to SQS (see _let_go)
            self._let_go()
            raise
        except asyncio.CancelledError:
            self._let_go()  # as given back: on FIFO, its group's held messages go back too
            raise
        # self._finish(returned=False) inlined: once per message.
        if self._holding:
            self._holding = False
            sub._settled(self, returned=False)

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> None:
        """Make the message visible again after ``delay`` seconds (rounded up to whole
        seconds) with ``ChangeMessageVisibility``. ``defer`` cannot keep the attempt: SQS
        counts every receive (``Capabilities.defer_keeps_attempt`` is false). ``error`` is
        ignored: the message's attributes cannot change (``Capabilities.carries_errors`` is
        false).

        Raises:
            NotSupported: ``delay`` is past the 12 hours this receive may stay invisible.
            DeliveryExpired, ConnectionLost: as for ``ack``.
        """
        self._check()
        seconds = math.ceil(max(delay, 0.0))
        if seconds > self.visibility_left():
            raise NotSupported(
                f"SQS keeps a message invisible at most 12 hours from its receive; a "
                f"{delay:.0f}s delay is past that for {self.id}"
            )
        self._done = True  # as for ack: the change goes out even if this is cancelled
        try:
            await self._sub.broker._change_visibility(self.queue_url, self.receipt, seconds)
        except BrokerError:
            self._done = False
            self._let_go()
            raise
        except asyncio.CancelledError:
            self._let_go()
            raise
        self._finish(returned=True)

    async def reject(self, reason: str) -> None:
        """Send the message to ``<topic>-dlq`` with the reason, then delete it.

        The receipt handle is checked first (a visibility change), so a stale delivery raises
        ``DeliveryExpired`` without writing a dead letter.

        Raises:
            DeliveryExpired, ConnectionLost: as for ``ack``.
        """
        self._check()
        try:
            await self._sub.broker._dead_letter(self, reason)
        except BrokerError:
            self._let_go()
            raise
        self._finish(returned=False)

    async def extend(self, seconds: float) -> bool:
        """Set the visibility to ``seconds`` from now, batched across deliveries
        (``ChangeMessageVisibilityBatch``). A no-op once settled, and while an ``ack`` or
        ``nack`` is on its way (a change racing it would undo the nack, or find the handle
        deleted). Past the 12-hour cap it stops extending, logs and
        counts it (``SqsBroker.visibility_capped``), and leaves the handler's timeout to decide.

        Returns:
            ``False`` for those no-ops, ``True`` if it extended.

        Raises:
            DeliveryExpired: SQS refused the receipt handle.
        """
        if self._done:
            return False
        left = math.floor(self.visibility_left())
        wanted = math.ceil(seconds)
        if left < wanted:
            if not self._capped:
                self._capped = True
                self._sub.broker.visibility_capped += 1
                log.warning(
                    "%s: message %s reached the 12-hour SQS visibility cap; not extended "
                    "further (the handler's timeout decides)",
                    self.topic,
                    self.id,
                )
            if left <= 0:
                return False
            wanted = left
        try:
            await self._sub.broker._change_visibility(self.queue_url, self.receipt, wanted)
        except DeliveryExpired:
            self._let_go()
            raise
        return True

    def _let_go(self) -> None:
        """After a failed settle (any ``BrokerError``) or a refused ``extend``
        (``DeliveryExpired``): the delivery stays unsettled but stops counting against the
        prefetch. A refused receipt handle means another consumer holds the message now, and
        a settle that failed otherwise (the runtime does not retry it) leaves the message to
        SQS, which hands it out again once its visibility runs out. A failed ``extend`` keeps
        its slot unless the handle was refused: the handler still runs."""
        if self._holding:
            self._holding = False
            self._sub._settled(self, returned=True)

    def _finish(self, *, returned: bool) -> None:
        self._done = True
        if self._holding:
            self._holding = False
            self._sub._settled(self, returned=returned)


def _text(attributes: Mapping[str, MessageAttributeValueOutputTypeDef], name: str) -> str | None:
    """The header ``name`` as ``_sqs_wire.decode`` reads it from the attributes, or ``None``."""
    value = attributes.get(name)
    return None if value is None else attribute_text(value)
