"""Exactly-once consume-transform-produce: one transactional producer per input partition.

Each input partition has its own transactional producer (``_kafka_owner``: a new owner's
``InitProducerId`` fences the previous one and resolves its open transaction before the
committed offset is read), so each partition's transactions are its own.

A transaction may only hold outputs of records below the offset it commits, or a crash after
the commit would run a record again whose outputs are already visible. So a handler's
``produce`` only buffers the record in its delivery. When a delivery is settled its outputs
wait by offset, and as the partition's lowest unfinished offset moves forward, the outputs of
the records it passed join the partition's pending list in offset order. Handlers therefore
run concurrently (per key, like at-least-once) while each partition's outputs keep the input
order. Once ``txn_messages`` records were passed, or ``txn_interval`` after the first, one
transaction sends the pending outputs in a burst (so the producer fills whole batches, as a
consume-transform-produce loop sending a fetched batch does) and commits the offset reached.
Passing needs no I/O, so every ack does it at once; only a commit takes the partition's lock.
While one commits, later acks pass their records into the next transaction and return, so no
handler waits on another's transaction; the next ack (or the poll loop, on the timer) commits
them, or the committing task itself once they fill a transaction. In this mode the
partition's window also counts records done but not passed yet, and records passed beyond
``txn_messages`` while a commit runs, which bounds the outputs held in memory.

A failed handler's outputs are never sent: ``nack`` and ``reject`` replace them with the
retry-topic or dead-letter record, which commits with the offset like any output. A
transaction that fails to commit (or whose commit was cancelled half way) is resolved by a new
producer (same id), and the partition rewinds to the committed offset read after that. A
fenced producer means another member owns the partition: this member drops it and its
deliveries expire. An output the broker refuses for good (over the topic's
``max.message.bytes``, an invalid record) would fail the same transaction on every replay: it
is traced back to its input record, which then commits with its dead-letter record instead of
its outputs (``_kafka_refused``), so the partition goes on and nothing else is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from oncely.brokers._kafka_burst import KeyHashes, delivered, send_burst
from oncely.brokers._kafka_options import (
    BODY_DROPPED,
    dlq_topic,
    encode_headers,
    flat_headers,
    map_errors,
)
from oncely.brokers._kafka_owner import PartitionOwner
from oncely.brokers._kafka_refused import REFUSED, blame, prune, unless_poison
from oncely.brokers._kafka_retry import dead_letter_copy, failure_copy
from oncely.brokers._kafka_size import MAX_REQUEST, oversize
from oncely.brokers._kafka_txn import Txn
from oncely.errors import AlreadySettled, BrokerError, DeliveryExpired

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from oncely.brokers._kafka_delivery import KafkaDelivery, Output
    from oncely.brokers._kafka_link import BrokerLink, SubscriptionLink
    from oncely.brokers._kafka_track import PartitionTrack

__all__ = ["ExactlyOnce"]

log = logging.getLogger("oncely.brokers.kafka")

PULL_PASS = 256
"""Most deliveries the worker's tasks take themselves (``take_ready``) in one pass of the
event loop, all tasks together; the rest are handed over by the consume loop. A commit makes
four round trips, and each waits for the pass under way: unbounded, every one of 64 tasks
could run 32 deliveries in a pass, some 2,000 records (50 ms of CPU) between two looks at
the sockets. 256 is some 4 ms of the copy's CPU: at 64 (1 ms) a third of the records went
through the hand-over (two wake-ups each) for a budget spent early in the pass, which cost
5% of the copy's instructions; 256 takes nearly all of that back (perf-eos7)."""


class ExactlyOnce(PartitionOwner):
    """The exactly-once side of one ``KafkaSubscription``."""

    def __init__(self, sub: SubscriptionLink, broker: BrokerLink) -> None:
        super().__init__(sub, broker)
        self._hashes = KeyHashes()
        self._pulls = 0
        """Deliveries the worker's tasks took themselves in this pass of the event loop."""

    def take_ready(self) -> KafkaDelivery | None:
        """The subscription's ``next_ready`` in this mode: a ready delivery for the task that
        just settled one (sparing a hand-over through the consume loop, about a tenth of the
        CPU per record), or ``None`` once ``PULL_PASS`` were taken in this pass."""
        if self._pulls >= PULL_PASS:
            return None
        delivery = self._sub.take_ready()
        if delivery is not None:
            if not self._pulls:  # a callback queued now runs in the next pass: it renews
                asyncio.get_running_loop().call_soon(self._new_pass)
            self._pulls += 1
        return delivery

    def _new_pass(self) -> None:
        self._pulls = 0

    # -- the Settler side ----------------------------------------------------------------------

    async def produce(self, delivery: KafkaDelivery, output: Output) -> None:
        """Buffer an output in its delivery (it is sent when its offset is reached), creating
        its topic first if need be. ``ExactlyOnceDelivery.produce`` buffers an output to a
        topic known to exist itself: this runs per output otherwise."""
        topic = output[0]
        if topic not in self._broker.known_topics:
            await self._broker.ensure_topics([topic])
            if delivery.settled:  # acked meanwhile: its outputs went to the transaction
                raise AlreadySettled(f"delivery {delivery.id} was settled while producing")
        delivery.outputs.append(output)

    async def fail(
        self, delivery: KafkaDelivery, how: str, delay: float, reason: str, attempt: int
    ) -> bool:
        """Replace the delivery's outputs with its retry or dead-letter record; ``False`` if
        a retry record could not be made and it is dead-lettered instead."""
        sub = self._sub
        if how == "reject":  # its own dead letter (and reason) instead of a refusal's
            delivery.track.eos.poison.pop(delivery.record.offset, None)
        topic, headers = await failure_copy(
            self._broker, sub.topic, delivery, how, delay, reason, attempt
        )
        key, body = delivery.record.key, delivery.body
        if (size := oversize(key, body, encode_headers(headers))) is not None:
            # An input topic may allow larger records than the producer sends: this copy can
            # never go out, and a transaction holding it fails on every replay, so the
            # partition would stop here for good. The record is dead-lettered without its
            # body instead (a retry copy could not go out either), at ERROR: its headers
            # name the original's partition and offset, where it stays until the input
            # topic's retention removes it, and ``BODY_DROPPED`` its size (``replay``
            # skips such a letter: an empty body is not the message).
            what = "dead-letter" if how == "reject" else "retry"
            tp, offset = delivery.track.tp, delivery.record.offset
            reason = (
                f"{reason}; its {what} copy ({size} bytes) is over the exactly-once "
                f"producer's max_request_size ({MAX_REQUEST}): dead-lettered without its body"
            )
            await self._broker.ensure_topics([dlq_topic(sub.topic)], partitions=1)
            topic, headers = dead_letter_copy(sub.topic, delivery, reason)
            headers[BODY_DROPPED] = str(len(body))
            body = b""
            log.error(
                "kafka: %s offset %d: its %s record is %d bytes when serialized, over the "
                "exactly-once producer's max_request_size (%d): dead-lettered without its "
                "body (the original stays at that offset until the topic's retention)",
                tp,
                offset,
                what,
                size,
                MAX_REQUEST,
            )
            delivery.outputs = [(topic, body, key, flat_headers(headers))]
            return how == "reject"
        delivery.outputs = [(topic, body, key, flat_headers(headers))]
        return True

    def ack(self, delivery: KafkaDelivery) -> Awaitable[None] | None:
        """Called once the delivery's offset was marked done: its outputs wait by offset, the
        records that became contiguous are passed, and if a transaction is due and none is
        committing, the commit is returned for the caller to await (that one's task does not
        wait for this: the next ack, or the poll loop's ``flush_due``, commits what was
        passed meanwhile). No coroutine unless there is I/O to do: this runs per record."""
        track = delivery.track
        txn: Txn = track.eos
        if not track.live or txn.track is not track:
            raise DeliveryExpired(f"partition of {delivery.id} was revoked or rewound")
        if delivery.outputs:
            outputs = tuple(delivery.outputs)  # see ``Output``: the collector untracks it
            if txn.poison:
                outputs = unless_poison(txn, self._sub.topic, delivery, outputs)
            txn.finished[delivery.record.offset] = outputs
        self._pass(txn, track)
        # _due() inlined, the clock read only once the count alone does not decide.
        count, opts = txn.count, self._opts
        if not count or (
            count < opts.txn_messages and time.monotonic() - txn.since < opts.txn_interval
        ):
            return None
        return None if txn.lock.locked() else self._flush_locked(txn, delivery)

    async def _flush_locked(self, txn: Txn, delivery: KafkaDelivery) -> None:
        # Nothing runs between ``ack``'s check and this: the caller awaits it at once, and
        # taking a free asyncio lock does not suspend.
        async with txn.lock:
            try:
                await self._flush(txn)
            except BrokerError:
                # A later commit of the loop failed (recovered in ``_flush``) once an earlier
                # one had committed this record: its ack succeeded, and a failed ack would
                # say the record runs again, which it never does.
                if delivery.record.offset >= delivery.track.committed:
                    raise

    # -- sending and committing ----------------------------------------------------------------

    def _pass(self, txn: Txn, track: PartitionTrack) -> None:
        """Move the outputs of the records the lowest unfinished offset has just passed to
        the pending list, in offset order. No I/O, so no lock: ``_commit`` takes its offset
        and its outputs in one step, and what is passed later goes to the next transaction."""
        passed = track.advance()
        if not passed:
            return
        if not txn.count:
            txn.since = time.monotonic()
        count = txn.count = txn.count + len(passed)
        # Beyond a transaction's budget only while a commit runs (else this ack commits):
        # those count in the window, so a slow commit pauses the partition instead of letting
        # outputs pile up without bound.
        held = count - self._opts.txn_messages
        track.held = held if held > 0 else 0
        finished = txn.finished
        if finished:
            pending = txn.pending
            for offset in passed:
                if (outputs := finished.pop(offset, None)) is not None:
                    pending.append((offset, outputs))
        self._sub.shrank(track)

    def _due(self, txn: Txn) -> bool:
        return bool(txn.count) and (
            txn.count >= self._opts.txn_messages
            or time.monotonic() - txn.since >= self._opts.txn_interval
        )

    async def flush_due(self) -> None:
        """Commit transactions whose budget is spent (from the poll loop)."""
        for txn in list(self._txns.values()):
            if (txn.unclear or self._due(txn)) and not txn.lock.locked():
                async with txn.lock:
                    with contextlib.suppress(BrokerError):  # handled: rewound or given up
                        await self._flush(txn)

    async def _flush(self, txn: Txn, *, force: bool = False, recover: bool = True) -> None:
        """Commit what was passed if the budget is spent, again while what passed meanwhile
        fills a transaction (or ``force``: until nothing is left, records settled meanwhile
        included). Call with ``txn.lock`` held. A failure
        gives the partition up (fenced) or starts it over from the committed offset, unless
        ``recover`` is false (the partition is being released anyway)."""
        track = txn.track
        if track is None or not track.live:
            return
        try:
            if txn.unclear:
                raise BrokerError(f"a commit on {txn.tp} was interrupted half way")
            self._pass(txn, track)
            while txn.count and (force or self._due(txn)):
                await self._commit(txn, track)
                self._pass(txn, track)
                # Again at once if the records passed meanwhile fill a transaction: they are
                # ``held`` in the window, and with the window full no ack comes to commit
                # them, so the partition stalled until the poll loop's next ``flush_due``.
                if not force and txn.count < self._opts.txn_messages:
                    break
        except DeliveryExpired:
            if recover:
                self._lose(txn)
            raise
        except BrokerError as exc:
            if not recover:
                raise
            if self._txns.get(txn.tp) is not txn:
                # Released (revoked or closing) while this committed: a new producer here
                # would take back a partition that is no longer ours.
                raise DeliveryExpired(f"{txn.tp} was given up while committing: {exc}") from exc
            log.warning("kafka: transaction on %s failed, starting over: %s", txn.tp, exc)
            await self._reinit(txn)
            raise DeliveryExpired(f"the transaction on {txn.tp} failed: {exc}") from exc

    async def _commit(self, txn: Txn, track: PartitionTrack) -> None:
        """One transaction: the pending outputs, then the offset every passed record reached."""
        # Not commit_point(): a record done but not passed yet has outputs that are not in
        # this transaction; committing past it would drop them. Records passed while this
        # awaits have offsets from ``point`` on and their outputs go to the next one.
        point = track.head()
        pending, txn.pending = txn.pending, []
        txn.count = 0
        if track.held:
            track.held = 0
            self._sub.shrank(track)
        producer = txn.producer
        what = f"committing the transaction on {txn.tp}"
        try:
            with map_errors(what, publishing=True):
                if txn.poison:
                    # Before the transaction, on every attempt: a poison record's dead letter
                    # may be in it, and a topic missing would fail it for good (not REFUSED).
                    # (A known topic returns at once: ensure_topics checks its cache first.)
                    await self._broker.ensure_topics([dlq_topic(self._sub.topic)], partitions=1)
                await producer.begin_transaction()
                txn.open = True
                sent = await send_burst(producer, pending, self._hashes, txn.suspects)
                if point > track.committed:
                    await producer.send_offsets_to_transaction({txn.tp: point}, self._opts.group)
                try:
                    await delivered(sent)  # aiokafka commits without a batch it could not write
                except REFUSED:
                    # Found now, the record is dead-lettered after the rewind this starts.
                    await blame(
                        txn, sent, pending, producer, self._hashes, dlq_topic(self._sub.topic)
                    )
                    raise
                await producer.commit_transaction()
        except BrokerError:
            raise
        except Exception as exc:  # the driver's state machine (assertions): as a failure
            raise BrokerError(f"{what}: {exc!r}") from exc
        except BaseException:
            # Cancelled (the poll loop stopping at close, an ack's task cancelled): the
            # producer may be inside a transaction whose outputs were just dropped here, or
            # committing it. A later commit on it could pass their offsets without them.
            txn.unclear = True
            raise
        txn.open = False
        track.committed = max(track.committed, point)
        if txn.poison or txn.suspects:
            prune(txn, track.committed)

    async def _reinit(self, txn: Txn) -> None:
        """After an unclear transaction outcome: a new producer (same id) resolves it, and the
        committed offset read after that says where to start."""
        try:
            await self._stop(txn)
            txn.open = False
            txn.producer = self._broker.transactional_producer(self.transactional_id(txn.tp))
            with map_errors(f"initialising the transactional producer of {txn.tp}"):
                await txn.producer.start()
            await self._rewind_to_committed(txn)
            txn.unclear = False
        except BrokerError as exc:
            # Neither the old nor a new producer works: stop the subscription so the worker
            # resubscribes, and the group reassigns the partition.
            log.error("kafka: could not restart the producer of %s: %s", txn.tp, exc)
            if txn.track is not None:
                self._sub.kill(txn.track)
            self._sub.fail(exc)

    def _lose(self, txn: Txn) -> None:
        """Fenced: give the partition up, and the subscription too. Usually another member
        owns the partition now, but a fence can also come from no member at all (a tool with
        the same transactional id, a transaction the coordinator timed out): then no
        rebalance would ever come and the partition would stay paused here for good. The
        worker resubscribes, which takes the partitions again with fresh producers."""
        log.warning("kafka: producer for %s was fenced; giving the partition up", txn.tp)
        self._sub.fail(DeliveryExpired(f"the transactional producer of {txn.tp} was fenced"))
        if txn.track is not None:
            self._sub.kill(txn.track)
            if self._sub.consumer is not None:
                with contextlib.suppress(Exception):
                    self._sub.consumer.pause(txn.tp)
        self._txns.pop(txn.tp, None)
        txn.open = False
        txn.finished.clear()
        txn.pending.clear()
        task = asyncio.get_running_loop().create_task(self._stop(txn))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
