"""The transactional producer of one exactly-once partition and its open transaction."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_delivery import Outputs
    from oncely.brokers._kafka_track import PartitionTrack

__all__ = ["Txn", "stop_producer"]


class Txn:
    """The transactional producer of one input partition and its open transaction."""

    __slots__ = (
        "count",
        "finished",
        "lock",
        "open",
        "origin",
        "pending",
        "poison",
        "producer",
        "since",
        "suspects",
        "tp",
        "track",
        "unclear",
    )

    def __init__(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        self.tp = tp
        self.producer = producer
        self.lock = asyncio.Lock()
        self.open = False
        self.count = 0
        """Records passed since the last commit (those with no outputs too)."""
        self.since = 0.0
        """When the first of them was passed (monotonic)."""
        self.finished: dict[int, Outputs] = {}
        """Outputs of settled records not passed yet, by offset."""
        self.pending: list[tuple[int, Outputs]] = []
        """Outputs of passed records (those that have some) by offset, in offset order, for
        the next transaction."""
        self.poison: dict[int, tuple[str, str]] = {}
        """Offsets whose output the broker refused for good: (topic refused, reason). Kept
        through a rewind, until committed (see ``_kafka_refused``)."""
        self.suspects: set[int] = set()
        """Offsets that may have had an output in a batch refused for good: their outputs go
        one per batch until committed (see ``_kafka_refused``)."""
        self.origin: int | None = None
        """Where the partition starts while it has no committed offset: the end or beginning
        read when it was taken, or the first record fetched of a dormant one."""
        self.track: PartitionTrack | None = None
        self.unclear = False
        """A commit was cancelled half way: the producer may be inside a transaction whose
        outputs are gone, so nothing may commit on it until a new producer resolves it."""


_STOPPING: set[asyncio.Task[None]] = set()
"""Stops whose waiter was cancelled twice: referenced until they end."""


async def stop_producer(producer: AIOKafkaProducer) -> None:
    """Stop ``producer``; a failure is ignored (it is being dropped). Cancelled meanwhile, the
    stop is still finished before the cancel goes on: aiokafka's ``stop`` marks the producer
    closed before it awaits anything, so one cut short is never finished by another call, and
    its connections and background tasks would stay open for good."""
    stop = asyncio.ensure_future(producer.stop())
    try:
        await asyncio.shield(stop)
    except asyncio.CancelledError:
        _STOPPING.add(stop)
        stop.add_done_callback(_stopped)
        await asyncio.wait([stop])  # cancelled again: it still runs to its end on its own
        raise
    except Exception:
        pass


def _stopped(stop: asyncio.Task[None]) -> None:
    _STOPPING.discard(stop)
    if not stop.cancelled():
        stop.exception()  # retrieved: a failure is ignored, as above
