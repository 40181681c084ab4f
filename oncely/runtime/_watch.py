"""What metrics and health read of a worker and of its sampler: kept apart so neither module
imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from oncely.brokers.base import Broker
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.stats import Stats
    from oncely.stores.base import IdempotencyStore


class Watched(Protocol):
    """What the observer reads of a worker."""

    specs: list[HandlerSpec]
    handler_stats: dict[str, Stats]
    broker: Broker | None
    store: IdempotencyStore | None

    @property
    def state(self) -> str: ...

    @property
    def load(self) -> dict[str, tuple[int, int]]: ...

    def enable_timings(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OutboxSample:
    backlog: int
    oldest_age: float | None


class Sampled(Protocol):
    """What the metrics collector reads of the health observer."""

    backlog: dict[str, dict[str, int]]
    outbox_samples: dict[str, OutboxSample]

    def health(self) -> dict[str, Any]: ...
