"""How a ``Runner`` settles a success under a lease: the completion recorded, then the ack.

Two ways, the same order and outcome:
- ``_succeeded``: this task awaits ``store.complete``, then ``delivery.ack``;
- ``_chained``, where the store can queue the completion without awaiting it
  (``completes_soon``) and the broker's batched ack can wait for it (``acks_after``,
  ``oncely.brokers._ack_after``): the ack is taken at once with the completion as its
  condition, so this task waits once, not twice (~14 k instructions a message less on
  RabbitMQ with the Redis store). The ack goes only if the completion was recorded; if it was
  not, nothing was acked and the completion is tried again as ``_succeeded`` does, then acked.

A failure to record is retried within a third of the visibility (``Keys.complete_retrying``)
and then acked anyway, logged as the crash window it is, in both.

``SuccessPaths`` is a base class of ``Runner``, as ``FailurePaths`` is: no call layer added.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from oncely.brokers._ack_after import AckWithheld
from oncely.runtime._keys import Lease

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime._keys import Keys
    from oncely.runtime._settle import Settler
    from oncely.runtime._tracing import Tracing
    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.stats import Stats


class SuccessPaths:
    """The settle of a ``Runner``'s success under a lease; it sets these attributes."""

    spec: HandlerSpec
    stats: Stats
    settle: Settler
    tracing: Tracing | None
    keys: Keys | None

    async def _succeeded(
        self, delivery: Delivery, store_key: str, token: str, result: bytes | None
    ) -> None:
        keys = self.keys
        if keys is not None:
            if self.spec.transactional:
                keys.finished(store_key)  # the transaction recorded the completion
            elif self.stats.store_seconds is None:
                # Keys.complete with timings off, inlined: a coroutine layer less per message.
                ttl = self.spec.result_ttl
                since = time.monotonic()
                try:
                    await keys.store.complete(store_key, token, result, ttl)
                except Exception as exc:
                    lease = Lease(store_key, token)
                    await keys.complete_retrying(lease, result, ttl, since, exc)
                finally:
                    event = keys.held.pop(store_key, None)  # keys.finished(), inlined
                    if event is not None:
                        event.set()
            else:
                await keys.complete(Lease(store_key, token), result, self.spec.result_ttl)
        if self.tracing is not None:
            if await self.settle.ack(delivery):
                self.stats.processed += 1
            return
        # Settler.ack inlined, as in run(): a coroutine less on every message with a store.
        try:
            await delivery.ack()
        except Exception:
            self.settle.ack_failed(delivery)
        else:
            stats = self.stats
            stats.acked += 1
            stats.processed += 1

    async def _chained(
        self, delivery: Delivery, store_key: str, token: str, result: bytes | None
    ) -> None:
        """``_succeeded`` with the ack chained onto the completion (``oncely.brokers._ack_after``):
        this task waits once, for the ack, whose batch waits for the completion's reply and
        acks only if it was recorded. If it was not, nothing was acked: the completion is
        tried again as ``_succeeded`` does, and then acked."""
        keys = self.keys
        assert keys is not None
        ttl = self.spec.result_ttl
        since = time.monotonic()
        try:
            try:
                recorded = keys.store.complete_soon(store_key, token, result, ttl)
            except Exception as exc:  # not connected, say: nothing queued
                failure = exc
            else:
                try:
                    await delivery.ack_after(recorded)  # type: ignore[attr-defined]
                except AckWithheld as withheld:
                    failure = withheld.error
                except Exception:
                    # The ack's own failure; the completion still counts, as when it goes first.
                    try:
                        await recorded
                    except Exception as exc:
                        lease = Lease(store_key, token)
                        await keys.complete_retrying(lease, result, ttl, since, exc)
                    self.settle.ack_failed(delivery)
                    return
                else:
                    stats = self.stats
                    stats.acked += 1
                    stats.processed += 1
                    return
            await keys.complete_retrying(Lease(store_key, token), result, ttl, since, failure)
        finally:
            event = keys.held.pop(store_key, None)  # keys.finished(), inlined
            if event is not None:
                event.set()
        # The completion was retried: a plain ack now (a rare path, not inlined).
        if await self.settle.ack(delivery):
            self.stats.processed += 1
