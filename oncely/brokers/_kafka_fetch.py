"""Taking fetched records from aiokafka's consumer without the garbage collector running
through them.

The subscription takes whole fetches at once (up to ``max_partition_fetch_bytes`` a
partition, some 7,000 small records), and aiokafka turns each record into a
``ConsumerRecord`` and its header tuples as it hands it out: about five new container
objects a record, all alive until the record is handled. With the collector on, that one
call set off a young collection every 700 or so of them (some 50 per fetch), each of which
found everything alive and moved it a generation up, so the middle generation filled and
full collections followed, each walking every object of the process (every module loaded,
some 30 ms each). In the exactly-once copy of ``benchmarks/kafka_throughput.py`` that was
about 410 young, 38 middle and 3 full collections per 50,000 records, 3.2 to 4.1 µs of CPU a
record; the raw loop, which takes 500 records at a time, paid 0.6.

So the records already fetched are taken with the collector paused (``drain``): the call
only decodes and returns them, no other task runs meanwhile (``getmany`` with no timeout
does not wait), and the collector runs once afterwards over what the call made. Waiting
for records is done with the collector on, taking at most one record, and what arrived is
then drained the same way. The collector's state is the application's: it is only paused
where it was enabled, and always restored.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

__all__ = ["fetch"]

Fetched = dict["TopicPartition", list[Any]]


async def fetch(consumer: AIOKafkaConsumer, timeout_ms: int) -> Fetched:
    """What ``consumer.getmany(timeout_ms=timeout_ms)`` returns: the records fetched for each
    partition, in offset order, waiting up to ``timeout_ms`` for some if none are."""
    batch = await drain(consumer)
    if batch:
        return batch
    batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=1)
    if batch:
        # The drain can still raise (another partition's fetch error, a coordinator error)
        # with the record taken above out of aiokafka's buffer. It is not lost: the error
        # ends the poll and the subscription is made again from the committed offsets,
        # and a track commits only up to records it was given (``PartitionTrack.head``).
        for tp, more in (await drain(consumer)).items():
            first = batch.get(tp)
            batch[tp] = more if first is None else [*first, *more]
    return batch


async def drain(consumer: AIOKafkaConsumer) -> Fetched:
    """The records fetched already, taken at once with the collector paused (see above)."""
    # During a rebalance ``getmany`` waits for the new assignment, and other tasks run:
    # not with the collector paused. (aiokafka's subscription state, pinned 0.14; without
    # it the collector is left alone.)
    state = getattr(consumer, "_subscription", None)
    if not gc.isenabled() or state is None or state.reassignment_in_progress:
        return await consumer.getmany(timeout_ms=0)
    gc.disable()
    try:
        return await consumer.getmany(timeout_ms=0)
    finally:
        gc.enable()
