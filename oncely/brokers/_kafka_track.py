"""Per-partition bookkeeping: contiguous commits and per-key ordering. No I/O.

Kafka's progress is one committed offset per partition, meaning "everything below is done".
Handlers finish out of order, so ``PartitionTrack`` keeps the offsets received and not yet
done in fetch order and commits only up to the lowest one still outstanding: a slow or
failed message at offset k holds the commit at k, whatever finished after it.

Ordering: records with the same ordering key run one after another, records with different
keys in parallel, even within one partition (what Confluent's Parallel Consumer does). A record
without a Kafka key has no ordering constraint. In ``partition`` mode every record of the
partition shares one key, so the partition runs strictly in offset order.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord, TopicPartition

__all__ = ["PartitionTrack"]

_PARTITION_KEY = b"\x00oncely-partition"


class PartitionTrack:
    """What one subscription knows about one assigned partition, for one ownership.

    A track is replaced (never reset) when ownership ends or an exactly-once partition rewinds,
    so deliveries can tell they are stale by ``live``.

    Attributes:
        live: false once the partition was lost, rewound or the subscription closed;
            settling a delivery of a dead track raises ``DeliveryExpired``.
        suspended: revoked, waiting to learn whether the next assignment gives it back.
        position: the next offset expected from the fetcher, or ``None`` before the first.
        backlog: fetched records not admitted yet (the window was full): the partition stays
            paused until they are in, so nothing fetched is thrown away and fetched again.
        committed: the offset this member last committed (or found committed).
        hold_until: wall-clock time until which a retry partition is paused (a record not
            yet due is at its head).
        held: exactly-once only: records passed into the next transaction beyond its
            ``txn_messages`` (a commit is running meanwhile); their outputs wait in memory,
            so they count in the window.
    """

    __slots__ = (
        "_busy",
        "_by_partition",
        "_done",
        "_outstanding",
        "backlog",
        "committed",
        "eos",
        "held",
        "hold_until",
        "in_flight",
        "live",
        "ordering",
        "parked",
        "paused",
        "position",
        "suspended",
        "tp",
    )

    def __init__(
        self,
        tp: TopicPartition,
        *,
        ordering: str,
        start: int | None = None,
        eos: Any = None,
    ) -> None:
        self.tp = tp
        self.ordering = ordering
        self._by_partition = ordering == "partition"
        self.position = start
        self.committed = start if start is not None else -1
        self.live = True
        self.suspended = False
        self.paused = False
        self.hold_until = 0.0
        self.in_flight = 0
        self.eos = eos
        self.held = 0
        self.parked: list[ConsumerRecord[bytes, bytes]] = []
        self.backlog: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._outstanding: deque[int] = deque()
        self._done: set[int] = set()
        # A key present is running; its deque (made only once a second record of the key
        # arrives) holds the records waiting behind it.
        self._busy: dict[bytes, deque[ConsumerRecord[bytes, bytes]] | None] = {}

    def take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Buffer a fetched record; one already seen (a fetch that raced a seek returns
        records below the position) is dropped."""
        offset: int = record.offset
        if self.position is not None and offset < self.position:
            return
        self.position = offset + 1
        self.backlog.append(record)

    def take_all(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """``take`` each of ``records`` (one fetch of this partition, in offset order)."""
        position = self.position
        if position is not None and records[0].offset < position:
            records = [r for r in records if r.offset >= position]
            if not records:
                return
        self.backlog.extend(records)
        self.position = records[-1].offset + 1

    def admit(self, limit: int) -> list[ConsumerRecord[bytes, bytes]]:
        """Move buffered records into the window while it has room; return those that may
        run now (the others wait behind their key)."""
        backlog = self.backlog
        room = limit - self.window
        if room <= 0 or not backlog:
            return []
        ready = []
        outstanding, busy, by_partition = self._outstanding, self._busy, self._by_partition
        while backlog and room > 0:
            record = backlog.popleft()
            room -= 1
            outstanding.append(record.offset)
            key = _PARTITION_KEY if by_partition else record.key
            if key is None:
                ready.append(record)  # no key, no order
            elif key not in busy:
                busy[key] = None
                ready.append(record)
            elif (waiting := busy[key]) is None:
                busy[key] = deque((record,))
            else:
                waiting.append(record)
        return ready

    def complete(self, record: ConsumerRecord[bytes, bytes]) -> ConsumerRecord[bytes, bytes] | None:
        """Mark ``record`` done; return the next record of its key that may run now."""
        self._done.add(record.offset)
        key = _PARTITION_KEY if self._by_partition else record.key
        if key is None:
            return None
        busy = self._busy
        waiting = busy.get(key)
        if waiting:
            return waiting.popleft()
        busy.pop(key, None)
        return None

    def advance(self) -> list[int]:
        """Drop the done offsets at the front of the window and return them, in order: the
        records the commit point has just passed."""
        passed = []
        outstanding, done = self._outstanding, self._done
        while outstanding and outstanding[0] in done:
            offset = outstanding.popleft()
            done.discard(offset)
            passed.append(offset)
        return passed

    def commit_point(self) -> int:
        """The offset to commit: the lowest outstanding one, or the next to fetch when all
        received are done. Never past a record that is still running or failed."""
        outstanding, done = self._outstanding, self._done
        while outstanding and outstanding[0] in done:
            done.discard(outstanding.popleft())
        return self.head()

    def head(self) -> int:
        """The lowest offset ``advance`` (or ``commit_point``) has not passed yet, without
        moving: exactly-once commits here, since a record done after the last ``advance``
        has outputs not sent yet."""
        outstanding = self._outstanding
        if outstanding:
            return outstanding[0]
        if self.backlog:
            first: int = self.backlog[0].offset
            return first
        return self.position if self.position is not None else self.committed

    @property
    def window(self) -> int:
        """Records admitted and not yet done (running or waiting behind a key); the backlog
        of fetched records waits outside it. In exactly-once mode records done but not yet
        passed by ``advance`` count too (their outputs wait in memory for a lower offset), and
        ``held``: records passed beyond a transaction's budget while another commits. So the
        window bounds the outputs held as well, however slow the commits are."""
        if self.eos is not None:
            return len(self._outstanding) + self.held
        return len(self._outstanding) - len(self._done)
