"""The Kafka broker's producers: how the idempotent one (every send) and the transactional
ones (exactly-once partitions, DLQ replays and purges) are made, and the idempotent one's
replacement after the broker refused one of its batches for good.

``Producers`` is a base class of ``KafkaBroker``, not an object it calls: the methods are found
on the broker's type as before, so no call layer or attribute read is added anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer

from oncely._tasks import spawn
from oncely.brokers._kafka_options import map_errors
from oncely.errors import BrokerError

if TYPE_CHECKING:
    from oncely.brokers._kafka_options import KafkaOptions

__all__ = ["RESTART_FAILED", "Producers"]

log = logging.getLogger("oncely.brokers.kafka")

RESTART_FAILED = "kafka: producer restart failed"


class Producers:
    """The producers of a ``KafkaBroker``; it sets these attributes."""

    options: KafkaOptions
    _producer: AIOKafkaProducer | None
    _renew_lock: asyncio.Lock
    _tasks: set[asyncio.Task[None]]

    def _idempotent_producer(self) -> AIOKafkaProducer:
        opts = self.options
        return AIOKafkaProducer(
            bootstrap_servers=opts.bootstrap,
            client_id=opts.client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=opts.linger_ms,
            request_timeout_ms=int(opts.request_timeout * 1000),
        )

    def transactional_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """A new (not started) transactional producer; ``start()`` runs InitProducerId."""
        opts = self.options
        return AIOKafkaProducer(
            bootstrap_servers=opts.bootstrap,
            client_id=opts.client_id,
            transactional_id=transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=opts.linger_ms,
            request_timeout_ms=int(opts.request_timeout * 1000),
        )

    async def _renew_producer(self, broken: AIOKafkaProducer, topic: str, exc: Exception) -> None:
        """Replace the idempotent producer after the broker refused one of its batches for
        good (a record over the topic's ``max.message.bytes``, say). That batch's sequence
        numbers were spent and never written, so the broker answers every later batch of the
        partition with OutOfOrderSequenceNumber, and aiokafka does not recover (no epoch
        bump): without a new producer (a new producer id) one refused record would fail every
        publish to its partition until the process restarts. Runs as the broker's task (a
        cancelled send does not cut it short) and never raises: a failed restart is logged,
        and the next refused batch tries again."""
        async with self._renew_lock:
            if self._producer is not broken:
                return  # renewed already (a send that failed alongside), or closed
            fresh = self._idempotent_producer()
            try:
                with map_errors("restarting the kafka producer"):
                    async with asyncio.timeout(self.options.request_timeout):
                        await fresh.start()
            except BaseException as error:
                with contextlib.suppress(Exception):
                    await fresh.stop()
                if not isinstance(error, BrokerError):
                    raise
                log.warning("kafka: could not restart the producer after a refusal: %s", error)
                return
            if self._producer is not broken:  # closed meanwhile: the new one is not wanted
                with contextlib.suppress(Exception):
                    await fresh.stop()
                return
            self._producer = fresh
        log.warning(
            "kafka: the broker refused a batch to %s for good (%r); producer restarted", topic, exc
        )
        spawn(self._tasks, self._retire(broken), log, RESTART_FAILED)

    async def _retire(self, old: AIOKafkaProducer) -> None:
        """Stop a replaced producer once the sends that took it just before the swap are done:
        stopped under them, a send still waiting for metadata would wait for ever."""
        try:
            await asyncio.sleep(2 * self.options.request_timeout)
        finally:
            with contextlib.suppress(Exception):
                await old.stop()
