"""What the private Kafka modules need of the broker and of a subscription.

``KafkaBroker`` satisfies ``BrokerLink`` and ``KafkaSubscription`` satisfies
``SubscriptionLink``, so ``_kafka_consume``, ``_kafka_eos``, ``_kafka_group`` and
``_kafka_dlq`` never import ``oncely.brokers.kafka`` or each other back: every import points
from the public module down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_delivery import KafkaDelivery
    from oncely.brokers._kafka_options import KafkaOptions
    from oncely.brokers._kafka_track import PartitionTrack

__all__ = ["BrokerLink", "SubscriptionLink"]


class BrokerLink(Protocol):
    """What a subscription, its exactly-once side and the DLQ admin need from ``KafkaBroker``."""

    options: KafkaOptions

    @property
    def known_topics(self) -> set[str]:
        """Topics this broker created or found (read-only use)."""
        ...

    async def ensure_topics(self, topics: list[str], *, partitions: int | None = None) -> None:
        """Create the topics that do not exist yet (idempotent, cached per broker)."""
        ...

    async def send(
        self, topic: str, body: bytes, *, key: bytes | None, headers: Mapping[str, str]
    ) -> None:
        """Produce one record and wait for its acknowledgement (``acks=all``)."""
        ...

    def transactional_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """A new (not started) transactional producer."""
        ...


class SubscriptionLink(Protocol):
    """What the rebalance listener and the exactly-once side need from ``KafkaSubscription``."""

    topic: str
    consumer: AIOKafkaConsumer | None
    tracks: dict[TopicPartition, PartitionTrack]

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Give up ``revoked`` partitions (after a grace for running handlers)."""
        ...

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Take ``assigned`` partitions, keeping tracks of a contiguous generation."""
        ...

    def fail(self, exc: BaseException) -> None:
        """Stop the subscription with ``exc``: the iterating task gets it and resubscribes."""
        ...

    def kill(self, track: PartitionTrack) -> None:
        """End this ownership: its deliveries raise ``DeliveryExpired`` from now on."""
        ...

    def shrank(self, track: PartitionTrack) -> None:
        """``track``'s window shrank: admit its backlog, resume it, once it has room."""
        ...

    def take_ready(self) -> KafkaDelivery | None:
        """The next delivery if one may be yielded now, else ``None``; never waits."""
        ...

    def new_track(self, tp: TopicPartition, start: int, eos: Any) -> None:
        """Install a track starting at ``start`` (exactly-once acquire and rewind)."""
        ...
