"""Kafka deliveries: one consumed record, settled against its partition's track. The
headers of the copy a ``nack`` or ``reject`` produces are made in ``_kafka_retry``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from oncely.brokers._kafka_options import FlatHeaders, header_list
from oncely.brokers._kafka_size import MAX_REQUEST, SURELY_FITS, oversize
from oncely.brokers.base import (
    Delivery,
    Headers,
    TransactionalDelivery,
    check_headers,
    error_headers,
)
from oncely.errors import (
    AlreadySettled,
    BrokerError,
    DeliveryExpired,
    NotSupported,
    PublishFailed,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

    from aiokafka.structs import ConsumerRecord

    from oncely.brokers._kafka_track import PartitionTrack

__all__ = [
    "ExactlyOnceDelivery",
    "KafkaDelivery",
    "Output",
    "Outputs",
    "Settler",
]

DUE = "oncely-due"
"""Wall-clock time before which a record in a retry topic must not run."""
TRANSPORT = frozenset({DUE})
"""Headers of the retry machinery, dropped before a record is handed to a handler."""
Output = tuple[str, bytes, "bytes | None", FlatHeaders]
"""An exactly-once output waiting for its offset: topic, value, key, encoded headers (flat:
name, value, name, value, ...; ``header_list`` pairs them when the output is sent). Tuples of
``str`` and ``bytes`` only, as flat as can be: the garbage collector untracks a tuple once the
tuples in it are, a level per collection, so the outputs held until their commit soon stop
being traversed by every collection and are not carried into the older generations (with a
list in each they were, which cost the copy about 1 µs of collection a record)."""
Outputs = tuple[Output, ...]
"""A settled record's outputs, untracked in the same way."""
_NONE: dict[str, bytes | None] = {}
_ABSENT = b"\x00absent"
"""What ``found.get`` returns for a header the record lacks (compared by identity)."""
_MESSAGE_ID = Headers.MESSAGE_ID
_KEY = Headers.KEY
_ATTEMPT = Headers.ATTEMPT
_ID_ROUGH = len(_MESSAGE_ID) * 4


class Settler(Protocol):
    """What a delivery needs from its subscription (``KafkaSubscription`` implements it)."""

    max_delay: float
    known_topics: set[str]
    """Topics known to exist: an exactly-once output to one of them is buffered in its
    delivery, to any other it goes through ``eos_produce``, which creates the topic first."""

    def settled(self, delivery: KafkaDelivery) -> Awaitable[None] | None:
        """Mark the delivery's offset done. Exactly-once, also pass it to the transaction
        (``ExactlyOnce.ack``): a commit it made due is returned, for the caller to await."""
        ...

    def run_again(self, delivery: KafkaDelivery) -> None: ...

    async def resend(self, delivery: KafkaDelivery, delay: float, attempt: int) -> None: ...

    async def dead_letter(self, delivery: KafkaDelivery, reason: str) -> None: ...

    async def eos_fail(
        self, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> bool:
        """Exactly-once: replace the outputs with a retry (``how="nack"``) or dead-letter
        record; ``False`` if the retry had to be a dead letter."""
        ...

    def eos_produce(self, delivery: KafkaDelivery, output: Output) -> Awaitable[None]: ...


def _attempt(text: str) -> int:
    try:
        return max(1, int(text))
    except ValueError:
        return 1


def _published_at(text: str | None, record: ConsumerRecord[bytes, bytes]) -> float:
    if text is not None:
        try:
            return float(text)
        except ValueError:
            pass
    return record.timestamp / 1000.0


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


class KafkaDelivery(Delivery):
    """A record of a partition this member owns.

    ``ack`` marks the offset done; the subscription commits the lowest contiguous done offset
    (at least once) or commits it in the partition's transaction (exactly once). ``nack``
    re-produces the record to a retry topic (or, for no delay, the topic itself) and then marks
    it done; ``reject`` does the same towards ``<topic>.dlq``. After the partition is revoked,
    settling raises ``DeliveryExpired``: the new owner reads it again from the committed offset.
    ``extend`` is a no-op while the partition is owned (the subscription keeps polling, so the
    member stays in the group), and raises ``DeliveryExpired`` once it is not.
    """

    __slots__ = (
        "_decoded",
        "_enqueued",
        "_raw",
        "_settled",
        "_settler",
        "outputs",
        "record",
        "track",
    )

    def __init__(
        self,
        settler: Settler,
        track: PartitionTrack,
        record: ConsumerRecord[bytes, bytes],
        topic: str,
    ) -> None:
        # ``Delivery.__init__`` inlined, and the headers decoded only when read: only the four
        # that make the identity and key are looked at here. Building the whole dict (and
        # parsing ``oncely-published-at``, a float of 17 digits) was over a third of a
        # delivery's construction, and most handlers never read either.
        raw = record.headers
        found: dict[str, bytes | None] = dict(raw) if raw else _NONE
        value = found.get(_MESSAGE_ID)
        mid = ""
        if value:
            try:  # _text() inlined: this runs per record
                mid = value.decode()
            except UnicodeDecodeError:
                mid = value.decode("latin-1")
        self.id = mid = mid or f"{record.topic}/{record.partition}/{record.offset}"
        self.topic = topic
        body = record.value
        self.body = body if body is not None else b""
        self.attempt = _attempt(_text(found[_ATTEMPT])) if _ATTEMPT in found else 1
        value = found.get(_KEY, _ABSENT)
        if value is _ABSENT:
            self.key = mid
        elif value:  # _text() inlined, as for the id
            try:
                self.key = value.decode()
            except UnicodeDecodeError:
                self.key = value.decode("latin-1")
        else:
            self.key = ""
        self._raw = found
        self._decoded: dict[str, str] | None = None
        self._enqueued: float | None = None
        self._settler = settler
        self.track = track
        self.record = record
        self._settled = False
        self.outputs: list[Output] = []

    @property
    def headers(self) -> Mapping[str, str]:
        """The record's headers (the last of a repeated name winning), decoded on first read:
        UTF-8 text (a plain producer's undecodable bytes keep their ``latin-1`` text rather
        than failing the message), the retry machinery's ``TRANSPORT`` headers left out."""
        decoded = self._decoded
        if decoded is not None:
            return decoded
        decoded = self._decoded = {}
        raw = self._raw
        if not raw:
            return decoded
        try:
            # A loop, not a comprehension (a function call of its own on Python 3.11, dearer
            # than a loop over a record's three or so headers): this runs per record.
            for name, value in raw.items():
                decoded[name] = value.decode()  # type: ignore[union-attr]
        except (AttributeError, UnicodeDecodeError):  # a None value, or not UTF-8
            decoded = self._decoded = {name: _text(value) for name, value in raw.items()}
        if DUE in decoded:  # TRANSPORT's one header: no loop over the set
            del decoded[DUE]
        return decoded

    @headers.setter
    def headers(self, value: Mapping[str, str]) -> None:
        self._decoded = dict(value)

    @property
    def enqueued_at(self) -> float:
        """``oncely-published-at`` where present, else the record's timestamp; parsed on first
        read."""
        enqueued = self._enqueued
        if enqueued is None:
            text = self._raw.get(Headers.PUBLISHED_AT)
            enqueued = _published_at(None if text is None else _text(text), self.record)
            self._enqueued = enqueued
        return enqueued

    @enqueued_at.setter
    def enqueued_at(self, value: float) -> None:
        self._enqueued = value

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def exactly_once(self) -> bool:
        return self.track.eos is not None

    def _check(self) -> None:
        if self._settled:
            raise AlreadySettled(f"delivery {self.id} was already settled")
        if not self.track.live:
            raise DeliveryExpired(
                f"partition {self.record.topic}[{self.record.partition}] of {self.id} was "
                "revoked; the new owner redelivers it"
            )

    async def ack(self) -> None:
        # _check() and mark_settled() inlined: this runs once per record.
        if self._settled or not self.track.live:
            self._check()
        self._settled = True
        # Exactly-once, a commit this makes due (its offset was marked done first, so the
        # transaction includes it).
        if (commit := self._settler.settled(self)) is not None:
            await commit

    async def _settle_exactly_once(self) -> None:
        # As ``ack``. Its outputs (or its retry or dead-letter record) go out once every lower
        # offset is done.
        self._check()
        self._settled = True
        if (commit := self._settler.settled(self)) is not None:
            await commit

    async def nack(
        self, delay: float = 0.0, *, defer: bool = False, error: str | None = None
    ) -> bool:
        self._check()
        if delay > self._settler.max_delay:
            raise NotSupported(
                f"delay {delay}s exceeds the largest retry bucket ({self._settler.max_delay}s)"
            )
        if error is not None:
            # The retry copy is built from these headers. This delivery is finished either
            # way: a failed resend runs the record again from its own (unchanged) headers.
            self.headers = error_headers(self.headers, error)
        attempt = self.attempt if defer else self.attempt + 1
        if self.exactly_once:
            retried = await self._settler.eos_fail(self, "nack", max(delay, 0.0), "", attempt)
            await self._settle_exactly_once()
            return retried
        try:
            await self._settler.resend(self, max(delay, 0.0), attempt)
        except BrokerError:
            self._run_again()
            raise
        self._check_live_after_send()
        self.mark_settled()
        return True

    async def reject(self, reason: str) -> None:
        self._check()
        if self.exactly_once:
            await self._settler.eos_fail(self, "reject", 0.0, reason, self.attempt)
            await self._settle_exactly_once()
            return
        try:
            await self._settler.dead_letter(self, reason)
        except BrokerError:
            self._run_again()
            raise
        self._check_live_after_send()
        self.mark_settled()

    def _run_again(self) -> None:
        # The copy was not stored, so the offset cannot be marked done. Left unsettled, the
        # record would hold its partition's commit and its key for as long as this member
        # owns the partition (nothing times a Kafka delivery out): run it again shortly
        # instead, as a visibility timeout would elsewhere. This delivery is finished.
        if not self._settled and self.track.live:
            self._settled = True
            self._settler.run_again(self)

    def _check_live_after_send(self) -> None:
        # The copy is stored; if the partition moved meanwhile the new owner also redelivers
        # the original (a duplicate, never a loss), and this offset is no longer ours.
        if not self.track.live:
            raise DeliveryExpired(f"partition of {self.id} was revoked while settling")

    def mark_settled(self) -> None:
        """Record the outcome; the partition's bookkeeping only if this ownership lasts (an
        exactly-once rewind settles a record by replaying it instead)."""
        self._settled = True
        if self.track.live:
            commit = self._settler.settled(self)
            assert commit is None, "at-least-once only: exactly-once settles await the commit"

    async def extend(self, seconds: float) -> bool:
        if self._settled:
            return False
        if not self.track.live:
            raise DeliveryExpired(f"partition of {self.id} was revoked")
        return True  # nothing times a record out: the check that it is still ours is all


class ExactlyOnceDelivery(KafkaDelivery, TransactionalDelivery):
    """A record of a partition consumed in exactly-once mode: ``produce`` sends in the
    partition's transaction, which also commits the consumed offsets (see ``_kafka_eos``)."""

    __slots__ = ()

    async def produce(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> str:
        # Deterministic by default: a replay after an abort gives its outputs the same ids,
        # so consumers outside the transaction can deduplicate them too.
        outputs = self.outputs
        mid = message_id or f"{self.id}/{len(outputs)}"
        data = mid.encode()
        # check_headers(), the encoding and a bound on the size in one pass: this runs for
        # every output. ``rough`` is what ``oversize`` would add up first, see there.
        rough = len(body) + _ID_ROUGH + len(data)
        key: bytes | None = None
        if headers:
            encoded: list[str | bytes] = []  # flat, see ``Output``
            append = encoded.append
            for name, value in headers.items():
                if type(name) is not str or type(value) is not str:
                    check_headers(headers)  # raises the precise TypeError (a str subclass is fine)
                if name == _MESSAGE_ID:
                    continue
                text = value.encode()
                append(name)
                append(text)
                rough += len(name) * 4 + len(text)
                if name == _KEY:
                    key = text
                    rough += len(text)
            append(_MESSAGE_ID)
            append(data)
        else:
            encoded = [_MESSAGE_ID, data]
        if self._settled or not self.track.live:
            self._check()
        flat = tuple(encoded)
        if rough + 8 * len(flat) >= SURELY_FITS and (
            size := oversize(key, body, header_list(flat), rough)
        ):  # ``oversize``'s own first test inlined (16 bytes a header): no call in the common case
            raise PublishFailed(
                f"an output for {topic} is {size} bytes when serialized, over the exactly-once "
                f"producer's max_request_size ({MAX_REQUEST}); it can never be sent"
            )
        output: Output = (topic, body, key, flat)
        if topic in self._settler.known_topics:
            outputs.append(output)  # sent once its offset is reached, see ``_kafka_eos``
        else:
            await self._settler.eos_produce(self, output)  # creates the topic first
        return mid
