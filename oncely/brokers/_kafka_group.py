"""Consumer-group helpers: the rebalance listener, a sticky assignor per subscription, and
the due time of a retry record."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from oncely.brokers._kafka_delivery import DUE

if TYPE_CHECKING:
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_link import SubscriptionLink

__all__ = ["RebalanceListener", "due_time", "sticky_assignor"]

log = logging.getLogger("oncely.brokers.kafka")


class RebalanceListener(ConsumerRebalanceListener):
    """Hands aiokafka's rebalance callbacks to the subscription.

    aiokafka logs a callback's exception and carries on, which would leave the subscription's
    bookkeeping half updated (a partition assigned without a track is never read). A failed
    callback therefore fails the subscription, and the worker resubscribes."""

    def __init__(self, sub: SubscriptionLink) -> None:
        self._sub = sub

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            await self._sub.on_revoked(revoked)
        except Exception as exc:
            log.error("kafka: handling revoked partitions %s failed", revoked, exc_info=True)
            self._sub.fail(exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._sub.on_assigned(assigned)
        except Exception as exc:
            log.error("kafka: handling assigned partitions %s failed", assigned, exc_info=True)
            self._sub.fail(exc)


def sticky_assignor() -> type[StickyPartitionAssignor]:
    """A sticky assignor class of its own.

    aiokafka's sticky assignor keeps its state (the member's previous assignment) on the class
    and never records the generation. A class per subscription keeps two consumers in one
    process from claiming each other's partitions; the subscription records the generation.
    """
    return type(
        "OncelyStickyAssignor",
        (StickyPartitionAssignor,),
        {"member_assignment": None, "generation": -1, "_latest_partition_movements": None},
    )


def due_time(record: Any) -> float:
    """The ``oncely-due`` time of a retry record, 0 when it has none."""
    for name, value in record.headers or ():
        if name == DUE:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
