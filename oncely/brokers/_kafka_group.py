"""Consumer-group helpers: the rebalance listener, a sticky assignor per subscription, and
the due time of a retry record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from oncely.brokers._kafka_delivery import DUE

if TYPE_CHECKING:
    from aiokafka.structs import TopicPartition

    from oncely.brokers._kafka_link import SubscriptionLink

__all__ = ["RebalanceListener", "due_time", "sticky_assignor"]


class RebalanceListener(ConsumerRebalanceListener):
    """Hands aiokafka's rebalance callbacks to the subscription."""

    def __init__(self, sub: SubscriptionLink) -> None:
        self._sub = sub

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sub.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._sub.on_assigned(assigned)


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
